/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The one boundary between duet's kernel side (pagecache.bpf.c) and user space (loader.py mirrors these
 * structs with ctypes; tests check the sizes agree). Fixed-width fields only.
 */
#ifndef DUET_PAGECACHE_H
#define DUET_PAGECACHE_H

/* Pages per merged chunk: one hash entry holds the bitmaps of 512 pages (2 MiB) of one file, as 8 words of 64.
 * A random event touches one hash entry per 2 MiB instead of per 256 KiB: a 2 GiB file read at random needs
 * 1,024 entries, which stay in the CPU's cache, where 8,192 did not (docs/benchmarks.md). */
#define WORD_SHIFT 6
#define WORD_PAGES (1u << WORD_SHIFT)
#define CHUNK_WORDS 8
#define CHUNK_SHIFT (WORD_SHIFT + 3)
#define CHUNK_PAGES (1u << CHUNK_SHIFT)
/* A folio larger than this (2048 pages, 4 chunks) is counted as lost rather than looped over. */
#define MAX_FOLIO_ORDER 11
#define MAX_FOLIO_CHUNKS (1u << (MAX_FOLIO_ORDER - CHUNK_SHIFT))

/* Event mask bits, as in Duet (also duet_core/events.py). */
#define DUET_ADDED    0x01
#define DUET_REMOVED  0x02
#define DUET_DIRTIED  0x04
#define DUET_FLUSHED  0x08

/* Scope flags (value of the `scopes` map, beside the event mask). */
#define SCOPE_CHECK_IGNORE 0x100 /* consult the `ignore` map: the scope is a part of the (dev, subvol) */

/* Per-CPU counters in the `stats` array. "pages" are weighted by folio size (1 << order). */
enum duet_stat {
	STAT_EVENTS,          /* tracepoint hits in scope */
	STAT_PAGES,           /* pages in scope, recorded or lost */
	STAT_LOST_MAP,        /* pages lost because the merge map was full */
	STAT_LOST_FOLIO,      /* pages lost because a folio was larger than MAX_FOLIO_CHUNKS */
	STAT_LOST_RING,       /* flush records lost because the ring was full */
	STAT_FLUSHES,         /* flush records sent */
	STAT_IGNORED,         /* events dropped by the ignore set */
	STAT_RETRIES,         /* buffer switches seen mid-update (retried on the other buffer) */
	STAT_COLLISIONS,      /* events whose table slot held another chunk: recorded in the merge hash map */
	STAT_NR,
};

/* Control array slots. */
enum duet_ctl {
	CTL_ACTIVE,           /* which merge buffer (0 or 1) programs write to; user space flips it */
	CTL_FILTER_GEN,       /* bumped by user space after every change to `scopes` or `ignore` */
	CTL_NR,
};

/* Slots of the per-CPU `memo` array: one per program, so that a program interrupted by another on its CPU (a
 * writeback completion in interrupt context) never finds its slot half written. */
enum duet_memo {
	MEMO_ADDED,
	MEMO_REMOVED,
	MEMO_DIRTIED,
	MEMO_FLUSHED,
	MEMO_NR,
};

/* Slots of the per-CPU in-flight counters: programs currently updating merge buffer 0 / 1, on this CPU. */
enum duet_inflight {
	INFLIGHT0,
	INFLIGHT1,
	INFLIGHT_NR,
};

struct file_key {
	__u32 dev;            /* superblock device, kernel encoding MAJOR << 20 | MINOR */
	__u32 gen;            /* i_generation: tells a reused inode number from the file that had it before */
	__u64 subvol;         /* btrfs subvolume (root objectid); 0 elsewhere */
	__u64 ino;
};

struct chunk_key {
	struct file_key file;
	__u64 chunk;          /* page index >> CHUNK_SHIFT */
};

/* Bit i of word w is page (chunk << CHUNK_SHIFT) + (w << WORD_SHIFT) + i. The four bitmaps of a word lie
 * side by side, so that an event touches one cache line of the value. */
struct chunk_word {
	__u64 added;          /* pages added to the cache since the last drain */
	__u64 removed;        /* pages removed from the cache since the last drain */
	__u64 present;        /* for pages in added|removed: 1 if the last of those events was an add */
	__u64 dirtied;        /* pages dirtied since the last drain */
};

struct chunk_val {
	struct chunk_word w[CHUNK_WORDS];
	__u64 first_dirty_ns; /* bpf_ktime_get_ns() of the first and last dirtying in this chunk, to order */
	__u64 last_dirty_ns;  /* dirtying against flush records, which travel on the ring */
};

/* A slot of a direct-mapped chunk table (`table0`, `table1`): the merge map's first level. A chunk's slot is fixed
 * by a hash of its file plus its chunk number, so that a file's chunks lie in consecutive slots; the program finds
 * it with an array index (no helper call, no hash walk) and sets the bits in place. A slot taken by another chunk
 * sends the event to the merge hash map instead. `state` is written last when a slot is claimed, so a program
 * that finds it SLOT_READY reads a complete key. */
enum duet_slot_state {
	SLOT_EMPTY,
	SLOT_CLAIMING,        /* a program on another CPU is writing the key */
	SLOT_READY,
};

struct chunk_slot {
	struct chunk_key key;
	__u64 state;
	struct chunk_val val;
};

/* A writeback episode of an inode ended (writeback:sb_clear_inode_writeback). */
struct flush_rec {
	struct file_key file;
	__u64 ts_ns;          /* bpf_ktime_get_ns() when the last folio's writeback ended */
	__u32 exact;          /* 1: the mapping had no dirty pages left, so every page dirtied before ts_ns is clean */
	__u32 pad;
};

/* Settings written by user space before load (read-only data: no map lookup on the hot path). */
struct duet_config {
	__u32 dirty_mark_bit;  /* XA_FLAGS_MARK(PAGECACHE_TAG_DIRTY) in i_pages.xa_flags (___GFP_LAST_BIT) */
	__u32 skip_added_tgid; /* drop ADDED caused by this process (duet run's own reads: it measures them itself) */
	__u32 slot_mask;       /* slots of each chunk table, less one (a power of two, set with the tables' size) */
	__u32 skip_added_tgid2; /* ... and this one: the run's other process (duet run --jobs 2), if not 0 */
};

/* The last file a program resolved on this CPU and what the filter said, valid while CTL_FILTER_GEN is `gen`:
 * a run of events of one file (a sequential read, a random one over one large file) looks `scopes` (and
 * `ignore`) up once, not per event. */
struct resolve_memo {
	struct file_key file;
	__u32 gen;
	__u32 mask;           /* resolve()'s answer: the scope's mask, 0 if the event is not wanted */
	__u32 ignored;        /* the answer came from `ignore` (counted as ignored again) */
	__u32 pad;
};

/* Pages lost per scope, so user space resyncs only what is affected. */
struct lost_key {
	__u32 dev;
	__u32 pad;
	__u64 subvol;
};

#endif /* DUET_PAGECACHE_H */
