"""Recipes that turn public datasets in their standard layouts into uio shards (see README.md)."""
