"""Shipped recipes (installed as the package data `wsseg.recipes`)."""
