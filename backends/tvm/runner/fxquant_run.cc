// fxquant_run: run an fxquant "tvm-arm" artifact on the device without Python.
//
//   fxquant_run --artifact DIR [--num-threads N] [--runs K] --input x.npy [--input ...] --output-dir OUT
//
// Does what run_model.py does, with only the TVM runtime libraries (libtvm_ffi.so, libtvm_runtime.so):
// checks model.so against the sha256 in manifest.json, checks every input's shape and dtype against the
// manifest (.npy, or raw little-endian bytes of exactly the manifest's size) and that float inputs are finite,
// runs the Relax VM's "main" on the CPU (or, in an artifact built for several batch sizes, the function built
// for the inputs' batch: "main_b<N>") and writes output_<i>.npy (run_<j>/output_<i>.npy with --runs K > 1:
// the inputs are K groups).
// Exit status 2: bad artifact, input or option, with one line on stderr; 1: the model failed to run.

#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <sched.h>
#include <sys/stat.h>

#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

/*! \brief A bad artifact, input or option: exit status 2. */
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot read " + path);
  std::ostringstream data;
  data << in.rdbuf();
  return data.str();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

// -- SHA-256 (FIPS 180-4), to check model.so against the manifest ---------------------------------------

class Sha256 {
 public:
  std::string HexDigest(const std::string& data) {
    uint64_t bits = static_cast<uint64_t>(data.size()) * 8;
    std::string padded = data + '\x80';
    while (padded.size() % 64 != 56) padded += '\0';
    for (int i = 7; i >= 0; --i) padded += static_cast<char>((bits >> (8 * i)) & 0xff);
    for (size_t off = 0; off < padded.size(); off += 64) Block(reinterpret_cast<const uint8_t*>(&padded[off]));
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t word : h_) {
      for (int i = 28; i >= 0; i -= 4) out += hex[(word >> i) & 0xf];
    }
    return out;
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void Block(const uint8_t* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) | (uint32_t(p[4 * i + 2]) << 8) |
             uint32_t(p[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }

  std::array<uint32_t, 8> h_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
};

// -- tensors: manifest specs, .npy files ----------------------------------------------------------------

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;  // numpy name: float32, int32, int8, ...
};

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

/*! \brief numpy's little-endian type string of a dtype name ("float32" -> "<f4"). */
std::string NpyDescr(const std::string& dtype) {
  DLDataType t = ffi::StringToDLDataType(dtype);
  char kind = t.code == kDLFloat ? 'f' : t.code == kDLInt ? 'i' : t.code == kDLUInt ? 'u' : '?';
  if (kind == '?' || t.lanes != 1 || t.bits % 8) throw UsageError("dtype " + dtype + " has no .npy form here");
  return std::string(t.bits == 8 ? "|" : "<") + kind + std::to_string(t.bits / 8);
}

size_t ByteSize(const TensorSpec& spec) {
  size_t count = 1;
  for (int64_t d : spec.shape) count *= static_cast<size_t>(d);
  return ffi::GetDataSize(count, ffi::StringToDLDataType(spec.dtype));
}

/*! \brief The value of ``'key': value`` in a .npy header dict, up to the next top-level comma. */
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw UsageError(path + ": .npy header has no '" + key + "'");
  size_t start = header.find(':', at) + 1, depth = 0, end = start;
  for (; end < header.size(); ++end) {
    char c = header[end];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if ((c == ',' && depth == 0) || c == '}') break;
  }
  std::string value = header.substr(start, end - start);
  value.erase(0, value.find_first_not_of(" "));
  value.erase(value.find_last_not_of(" ") + 1);
  return value;
}

/*! \brief The data bytes of an input file, checked against its spec: a C-order .npy or raw bytes. */
std::string ReadInput(const std::string& path, const TensorSpec& spec) {
  std::string raw = ReadFile(path);
  std::string wanted = ShapeText(spec.shape) + " " + spec.dtype;
  if (raw.compare(0, 6, "\x93NUMPY") != 0) {
    if (raw.size() != ByteSize(spec)) {
      throw UsageError("input " + spec.name + ": raw file " + path + " has " + std::to_string(raw.size()) +
                       " bytes, expected " + std::to_string(ByteSize(spec)) + " (" + wanted + ")");
    }
    return raw;
  }
  if (raw.size() < 10) throw UsageError(path + ": truncated .npy header");
  size_t header_len, offset;
  if (raw[6] == 1) {
    header_len = uint8_t(raw[8]) | (size_t(uint8_t(raw[9])) << 8), offset = 10;
  } else {
    if (raw.size() < 12) throw UsageError(path + ": truncated .npy header");
    header_len = uint8_t(raw[8]) | (size_t(uint8_t(raw[9])) << 8) | (size_t(uint8_t(raw[10])) << 16) |
                 (size_t(uint8_t(raw[11])) << 24);
    offset = 12;
  }
  if (raw.size() < offset + header_len) throw UsageError(path + ": truncated .npy header");
  std::string header = raw.substr(offset, header_len);
  std::string descr = HeaderField(header, "descr", path), order = HeaderField(header, "fortran_order", path);
  std::string shape_text = HeaderField(header, "shape", path);
  std::vector<int64_t> shape;
  for (size_t i = 0; i < shape_text.size();) {
    if (isdigit(static_cast<unsigned char>(shape_text[i]))) {
      size_t used;
      shape.push_back(std::stoll(shape_text.substr(i), &used));
      i += used;
    } else {
      ++i;
    }
  }
  std::string got_dtype = descr == "'" + NpyDescr(spec.dtype) + "'" ? spec.dtype : descr;
  if (shape != spec.shape || got_dtype != spec.dtype) {
    throw UsageError("input " + spec.name + ": expected " + wanted + ", got " + ShapeText(shape) + " " + got_dtype);
  }
  if (order != "False") throw UsageError("input " + spec.name + ": " + path + " is Fortran-ordered; save it C-ordered");
  std::string data = raw.substr(offset + header_len);
  if (data.size() != ByteSize(spec)) throw UsageError(path + ": the .npy data is truncated");
  return data;
}

/*! \brief Refuse NaN and Inf in a float32 input, as every other fxquant entry point does. */
void CheckFinite(const std::string& data, const TensorSpec& spec, const std::string& path) {
  if (spec.dtype != "float32") return;
  for (size_t at = 0; at + sizeof(float) <= data.size(); at += sizeof(float)) {
    float value;
    std::memcpy(&value, data.data() + at, sizeof(float));
    if (!std::isfinite(value)) {
      throw UsageError("input " + spec.name + ": " + path + " holds NaN or Inf values; the model accepts finite "
                       "inputs only");
    }
  }
}

std::string NpyBytes(const DLTensor& tensor) {
  std::vector<int64_t> shape(tensor.shape, tensor.shape + tensor.ndim);
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '" + NpyDescr(std::string(ffi::DLDataTypeToString(tensor.dtype))) +
                       "', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string out = std::string("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(static_cast<const char*>(tensor.data) + tensor.byte_offset, ffi::GetDataSize(tensor));
  return out;
}

struct CpuAlloc {
  void AllocData(DLTensor* tensor) {
    tensor->data = std::aligned_alloc(64, (ffi::GetDataSize(*tensor) + 63) / 64 * 64);
    if (tensor->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

// -- the manifest ---------------------------------------------------------------------------------------

std::vector<TensorSpec> Specs(const ffi::json::Object& manifest, const char* key) {
  std::vector<TensorSpec> specs;
  for (const ffi::Any& item : manifest.at(key).cast<ffi::json::Array>()) {
    auto entry = item.cast<ffi::json::Object>();
    TensorSpec spec{std::string(entry.at("name").cast<ffi::String>()), {},
                    std::string(entry.at("dtype").cast<ffi::String>())};
    for (const ffi::Any& d : entry.at("shape").cast<ffi::json::Array>()) spec.shape.push_back(d.cast<int64_t>());
    specs.push_back(spec);
  }
  return specs;
}

/*! \brief A compiled function and its inputs: "main", then one per further batch size (``batch_variants``). */
struct Function {
  std::string name;
  std::vector<TensorSpec> inputs;
};

std::vector<Function> Functions(const ffi::json::Object& manifest) {
  std::vector<Function> functions{{"main", Specs(manifest, "inputs")}};
  if (!manifest.count("batch_variants")) return functions;
  for (const ffi::Any& item : manifest.at("batch_variants").cast<ffi::json::Array>()) {
    auto entry = item.cast<ffi::json::Object>();
    functions.push_back({std::string(entry.at("function").cast<ffi::String>()), Specs(entry, "inputs")});
  }
  return functions;
}

/*! \brief One run's inputs read and checked against the first function whose shapes they have. */
std::pair<size_t, std::vector<std::string>> ReadRun(const std::vector<Function>& functions,
                                                    const std::vector<std::string>& paths) {
  std::string first_error;
  for (size_t f = 0; f < functions.size(); ++f) {
    try {
      std::vector<std::string> data;
      for (size_t i = 0; i < paths.size(); ++i) {
        data.push_back(ReadInput(paths[i], functions[f].inputs[i]));
        CheckFinite(data.back(), functions[f].inputs[i], paths[i]);
      }
      return {f, data};
    } catch (const UsageError& err) {
      if (f == 0) first_error = err.what();
      if (std::string(err.what()).find("NaN or Inf") != std::string::npos) throw;
    }
  }
  if (functions.size() == 1) throw UsageError(first_error);
  std::string sizes;
  for (const Function& fn : functions) sizes += (sizes.empty() ? "" : ", ") + std::to_string(fn.inputs[0].shape[0]);
  throw UsageError(first_error + " (compiled batch sizes: " + sizes + ")");
}

struct Options {
  std::string artifact = ".", output_dir = ".";
  std::vector<std::string> inputs;
  int num_threads = 0, runs = 1;
};

int PositiveInt(const std::string& flag, const char* text) {
  char* end = nullptr;
  long value = std::strtol(text, &end, 10);
  if (*text == '\0' || *end != '\0' || value < 1 || value > 1 << 20) {
    throw UsageError(flag + ": expected a positive integer, got '" + text + "'");
  }
  return static_cast<int>(value);
}

Options Parse(int argc, char** argv) {
  Options opts;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << "usage: fxquant_run --artifact DIR [--num-threads N] [--runs K] --input FILE [--input FILE ...] "
                   "--output-dir OUT\n";
      std::exit(0);
    }
    if (i + 1 >= argc) throw UsageError(flag + " needs a value");
    const char* value = argv[++i];
    if (flag == "--artifact") {
      opts.artifact = value;
    } else if (flag == "--output-dir") {
      opts.output_dir = value;
    } else if (flag == "--input") {
      opts.inputs.push_back(value);
    } else if (flag == "--num-threads") {
      opts.num_threads = PositiveInt(flag, value);
    } else if (flag == "--runs") {
      opts.runs = PositiveInt(flag, value);
    } else {
      throw UsageError("unknown option " + flag);
    }
  }
  return opts;
}

/*! \brief ``threads`` TVM workers sharing this process's cores (mode -3); the caller's affinity is kept. */
void SetNumThreads(int threads) {
  auto configure = ffi::Function::GetGlobal("runtime.config_threadpool");
  if (!configure) throw std::runtime_error("runtime.config_threadpool is missing from the TVM runtime");
  cpu_set_t affinity;
  ffi::Array<ffi::String> cpus;
  bool known = sched_getaffinity(0, sizeof(affinity), &affinity) == 0;
  for (int cpu = 0; known && cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &affinity)) cpus.push_back(ffi::String(std::to_string(cpu)));
  }
  (*configure)(-3, threads, cpus);
  if (known) sched_setaffinity(0, sizeof(affinity), &affinity);
}

void MakeDir(const std::string& path) {
  if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) throw std::runtime_error("cannot create " + path);
}

int Run(const Options& opts) {
  auto manifest = ffi::json::Parse(ReadFile(opts.artifact + "/manifest.json")).cast<ffi::json::Object>();
  std::string library = opts.artifact + "/model.so";
  std::string expected = std::string(manifest.at("files").cast<ffi::json::Object>().at("model.so")
                                         .cast<ffi::json::Object>().at("sha256").cast<ffi::String>());
  struct stat info;
  if (stat(library.c_str(), &info) != 0) throw UsageError(library + " is missing");
  if (Sha256().HexDigest(ReadFile(library)) != expected) {
    throw UsageError(library + " does not match the sha256 in manifest.json (truncated or corrupted)");
  }
  std::vector<Function> functions = Functions(manifest);
  size_t per_run = functions[0].inputs.size();
  if (opts.inputs.size() != per_run * opts.runs) {
    throw UsageError("expected " + std::to_string(per_run * opts.runs) + " input file(s) (" +
                     std::to_string(per_run) + " per run), got " + std::to_string(opts.inputs.size()));
  }
  std::vector<std::pair<size_t, std::vector<std::string>>> data;  // every input is checked before anything runs
  for (int run = 0; run < opts.runs; ++run) {
    std::vector<std::string> paths(opts.inputs.begin() + run * per_run, opts.inputs.begin() + (run + 1) * per_run);
    data.push_back(ReadRun(functions, paths));
  }
  if (opts.num_threads > 0) SetNumThreads(opts.num_threads);
  DLDevice cpu{kDLCPU, 0};
  ffi::Module executable = ffi::Module::LoadFromFile(library);
  ffi::Module vm = executable->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  constexpr int kPooledAllocator = 2;
  vm->GetFunction("vm_initialization").value()(static_cast<int>(cpu.device_type), cpu.device_id, kPooledAllocator);
  MakeDir(opts.output_dir);
  for (int run = 0; run < opts.runs; ++run) {
    const auto& [index, bytes] = data[run];
    const std::vector<TensorSpec>& specs = functions[index].inputs;
    ffi::Function function = vm->GetFunction(functions[index].name).value();
    std::vector<ffi::AnyView> args;
    std::vector<ffi::Tensor> tensors;
    for (size_t i = 0; i < per_run; ++i) {
      tensors.push_back(ffi::Tensor::FromNDAlloc(CpuAlloc(), ffi::ShapeView(specs[i].shape.data(), specs[i].shape.size()),
                                                 ffi::StringToDLDataType(specs[i].dtype), cpu));
      std::memcpy(tensors.back().data_ptr(), bytes[i].data(), bytes[i].size());
    }
    for (const ffi::Tensor& t : tensors) args.emplace_back(t);
    ffi::Any result;
    function.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    std::vector<ffi::Tensor> outputs;
    if (auto single = result.try_cast<ffi::Tensor>()) {
      outputs.push_back(*single);
    } else {
      for (const ffi::Any& item : result.cast<ffi::Array<ffi::Any>>()) outputs.push_back(item.cast<ffi::Tensor>());
    }
    std::string dir = opts.output_dir;
    if (opts.runs > 1) MakeDir(dir += "/run_" + std::to_string(run));
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::string path = dir + "/output_" + std::to_string(i) + ".npy";
      WriteFile(path, NpyBytes(*outputs[i].GetDLTensorPtr()));
      std::cout << path << "\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(Parse(argc, argv));
  } catch (const UsageError& err) {
    std::cerr << "fxquant_run: " << err.what() << "\n";
    return 2;
  } catch (const std::exception& err) {
    std::string what = err.what();
    std::cerr << "fxquant_run: " << what.substr(0, what.find('\n')) << "\n";
    return 1;
  }
}
