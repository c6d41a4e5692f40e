"""The plugins that ship with planes: the planes themselves and their extensions."""
