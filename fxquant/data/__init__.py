"""Datasets the pipeline trains and verifies on: Fashion-MNIST held in memory, image folders, named by one string."""
