"""Helpers shared by the test folders. Light modules (paths, processes) import nothing heavy;
the others import torch or the product and are imported only by the folders that need them."""
