"""Query datasets, label files and host-to-global array helpers."""
