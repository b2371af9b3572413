"""Storage: image validation and cache, volumes and their snapshots, through qemu-img."""
