"""duet's kernel side: the BPF program (``pagecache.bpf.c``), its build (``build``) and its loader (``loader``)."""

# Entries of each of the two merge maps: distinct (file, 512-page chunk) pairs with events between two drains.
# About 12 MiB of kernel memory per map (a 32-byte key, a 272-byte value and the hash map's own overhead each);
# beyond it, pages are counted as lost and their scope resynced (never a silent gap).
MERGE_ENTRIES = 32768
