// SPDX-License-Identifier: GPL-2.0
/*
 * duet's kernel side: page-cache events for registered filesystems, merged per (file, 512-page chunk).
 *
 * Four BTF tracepoints (tp_btf, so the programs read the folio and inode directly, with CO-RE offsets):
 *   mm_filemap_add_to_page_cache       -> ADDED    (one event per folio: weighted by 1 << order)
 *   mm_filemap_delete_from_page_cache  -> REMOVED
 *   writeback_dirty_folio              -> DIRTIED  (the classic tracepoint has no folio; tp_btf does)
 *   sb_clear_inode_writeback           -> FLUSHED  (inode level: there is no folio-level "writeback done"
 *                                          tracepoint; this one fires on every filesystem when the last
 *                                          folio under writeback of an inode completes, for fsync, sync and
 *                                          background writeback alike. See docs/engine.md.)
 *
 * Scope: an event is kept only if its (superblock dev, subvolume) is in `scopes`, and, when that scope is only
 * part of the subvolume, its inode is not in `ignore` (files user space found outside every scope, or done by
 * every task); each program remembers, per CPU, the answer for the last file it saw until user space changes
 * either map (struct resolve_memo). Merge: ADDED/REMOVED/DIRTIED set bits in an entry per (file, chunk), so a
 * record stands for up to 512 pages and a Python loop never runs per page: in the chunk's slot of a direct-mapped
 * table (struct chunk_slot; an array index, no helper call), or, when another chunk holds that slot, in a hash
 * map. Two merge buffers (each a table and a hash map) alternate: programs write the active one while user space
 * drains the other (draining a map under update loses pages, measured in DESIGN.md); a per-buffer in-flight count
 * tells user space when the last writer has left. FLUSHED records are rare and travel on a ring buffer. Every page
 * that cannot be recorded is counted, per scope, in `lost`.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "pagecache.h"

char LICENSE[] SEC("license") = "GPL";

#define BTRFS_SUPER_MAGIC 0x9123683E

/* Set by user space before load. XA_FLAGS_MARK(PAGECACHE_TAG_DIRTY) is bit ___GFP_LAST_BIT of
 * mapping->i_pages.xa_flags; that constant lives in an anonymous enum, so CO-RE cannot relocate it and the
 * loader reads it from the running kernel's BTF. */
const volatile struct duet_config cfg = { .dirty_mark_bit = 25, .skip_added_tgid = 0, .slot_mask = 8191,
					   .skip_added_tgid2 = 0 };

/* The first level of each merge buffer: direct-mapped chunk slots (struct chunk_slot). Memory-mapped, so that user
 * space reads and clears a drained table in place, without a system call. */
struct slot_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 8192); /* user space sets it before load, with cfg.slot_mask */
	__type(key, __u32);
	__type(value, struct chunk_slot);
};
struct slot_table table0 SEC(".maps");
struct slot_table table1 SEC(".maps");

struct merge_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768); /* user space sets it before load (loader.MERGE_ENTRIES) */
	__type(key, struct chunk_key);
	__type(value, struct chunk_val);
};
struct merge_map merge0 SEC(".maps");
struct merge_map merge1 SEC(".maps");

/* (dev, subvol) -> event mask | SCOPE_* flags. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct lost_key);
	__type(value, __u32);
} scopes SEC(".maps");

/* Files whose events nobody wants. LRU: forgetting one only costs user space a lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct file_key);
	__type(value, __u8);
} ignore SEC(".maps");

/* (dev, subvol) -> pages lost; user space reads and deletes, then resyncs those scopes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct lost_key);
	__type(value, __u64);
} lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} flushes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_NR);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CTL_NR);
	__type(key, __u32);
	__type(value, __u32);
} ctl SEC(".maps");

/* Per CPU, so that every event does not bounce one cache line between the CPUs (a program runs on one CPU from
 * start to end: its increment and decrement meet the same counter). User space sums them over the CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, INFLIGHT_NR);
	__type(key, __u32);
	__type(value, __u64);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MEMO_NR);
	__type(key, __u32);
	__type(value, struct resolve_memo);
} memo SEC(".maps");

static __always_inline void stat_add(__u32 which, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);

	if (v)
		*v += n; /* per-CPU: no other writer */
}

static __always_inline void count_lost(const struct file_key *fk, __u64 pages)
{
	struct lost_key lk = { .dev = fk->dev, .subvol = fk->subvol };
	__u64 *v = bpf_map_lookup_elem(&lost, &lk);

	if (!v) {
		__u64 zero = 0;

		bpf_map_update_elem(&lost, &lk, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&lost, &lk);
	}
	if (v)
		__sync_fetch_and_add(v, pages);
	/* If even `lost` is full, STAT_LOST_* still counts it and user space resyncs every scope. */
}

static __always_inline bool same_file(const struct file_key *a, const struct file_key *b)
{
	return a->ino == b->ino && a->dev == b->dev && a->subvol == b->subvol && a->gen == b->gen;
}

/* Identify the file and check the scope. Returns the scope's mask, 0 if the event is not wanted. `slot`: the
 * calling program's memo (enum duet_memo). */
static __always_inline __u32 resolve(struct inode *inode, struct file_key *fk, __u32 slot)
{
	struct super_block *sb;
	struct lost_key sk = {};
	struct resolve_memo *m;
	__u32 gen_slot = CTL_FILTER_GEN, gen, mask;
	__u32 *scope, *g;

	if (!inode)
		return 0;
	/* Regular files only: btrfs' btree inode, ext4's buddy cache and directories have page cache too. */
	if ((inode->i_mode & 0170000) != 0100000)
		return 0;
	sb = inode->i_sb;
	fk->dev = sb->s_dev;
	fk->gen = inode->i_generation;
	fk->ino = inode->i_ino;
	fk->subvol = 0;
	if (sb->s_magic == BTRFS_SUPER_MAGIC) {
		/* container_of(inode, struct btrfs_inode, vfs_inode)->root->root_key.objectid */
		struct btrfs_inode *bi = (void *)inode - bpf_core_field_offset(struct btrfs_inode, vfs_inode);

		fk->subvol = BPF_CORE_READ(bi, root, root_key.objectid);
	}
	/* The generation is read before the maps: a change user space makes meanwhile bumps it after, so an answer
	 * kept with this generation is never trusted past the change. */
	g = bpf_map_lookup_elem(&ctl, &gen_slot);
	m = bpf_map_lookup_elem(&memo, &slot);
	if (!g || !m)
		return 0;
	gen = *(volatile __u32 *)g;
	if (m->gen == gen && same_file(&m->file, fk)) {
		if (m->ignored)
			stat_add(STAT_IGNORED, 1);
		return m->mask;
	}
	m->file = *fk;
	m->gen = gen;
	m->ignored = 0;
	sk.dev = fk->dev;
	sk.subvol = fk->subvol;
	scope = bpf_map_lookup_elem(&scopes, &sk);
	mask = scope ? *scope : 0;
	if (mask && (mask & SCOPE_CHECK_IGNORE) && bpf_map_lookup_elem(&ignore, fk)) {
		stat_add(STAT_IGNORED, 1);
		m->ignored = 1;
		mask = 0;
	}
	m->mask = mask;
	return mask;
}

/* Set `bits` in words [w, w + nw) of the chunk (nw > 1 only for whole words: a folio of 64 pages or more). */
static __always_inline void apply(struct chunk_val *v, __u32 w, __u32 nw, __u64 bits, __u32 ev)
{
	int i;

	for (i = 0; i < CHUNK_WORDS; i++) {
		struct chunk_word *cw;
		__u32 j = w + i;

		if (i >= nw)
			break;
		/* Callers keep w + nw <= CHUNK_WORDS; the mask is for the verifier, which must see the index
		 * bounded (the barrier keeps the compiler from proving the mask useless and dropping it). */
		asm volatile("" : "+r"(j));
		cw = &v->w[j & (CHUNK_WORDS - 1)];
		if (ev == DUET_ADDED) {
			__sync_fetch_and_or(&cw->added, bits);
			__sync_fetch_and_or(&cw->present, bits);
		} else if (ev == DUET_REMOVED) {
			__sync_fetch_and_or(&cw->removed, bits);
			__sync_fetch_and_and(&cw->present, ~bits);
		} else {
			__sync_fetch_and_or(&cw->dirtied, bits);
		}
	}
	if (ev == DUET_DIRTIED) {
		__u64 now = bpf_ktime_get_ns();

		__sync_val_compare_and_swap(&v->first_dirty_ns, 0, now);
		v->last_dirty_ns = now;
	}
}

/* A chunk's slot: a hash of its file, plus its chunk number (a file's chunks lie side by side, without colliding
 * with each other). */
static __always_inline __u32 slot_of(const struct chunk_key *k)
{
	__u64 h = (k->file.ino ^ (k->file.subvol << 32) ^ ((__u64)k->file.dev << 40) ^ ((__u64)k->file.gen << 20)) *
		  0x9E3779B97F4A7C15ULL;

	return ((__u32)(h >> 32) + (__u32)k->chunk) & cfg.slot_mask;
}

/* Record `bits` in the chunk's table slot if the slot is the chunk's or free. Returns 0 when recorded, 1 when the
 * slot holds another chunk (the caller records it in the hash map), -1 when another CPU's claim of the slot did
 * not finish within SLOT_SPIN looks (counted as lost: the chunk could end up in both places). The state is read
 * with an atomic operation, a full barrier, so the key read after it is the one written before it was READY. */
#define SLOT_SPIN 64
static __always_inline int update_slot(void *table, const struct chunk_key *k, __u32 w, __u32 nw, __u64 bits,
				       __u32 ev)
{
	__u32 idx = slot_of(k);
	struct chunk_slot *s = bpf_map_lookup_elem(table, &idx);
	__u64 st;
	int i;

	if (!s)
		return 1;
	st = __sync_fetch_and_or(&s->state, 0);
	if (st == SLOT_EMPTY) {
		st = __sync_val_compare_and_swap(&s->state, SLOT_EMPTY, SLOT_CLAIMING);
		if (st == SLOT_EMPTY) {
			s->key = *k;
			__sync_fetch_and_add(&s->state, SLOT_READY - SLOT_CLAIMING);
			apply(&s->val, w, nw, bits, ev);
			return 0;
		}
	}
	for (i = 0; i < SLOT_SPIN && st == SLOT_CLAIMING; i++)
		st = __sync_fetch_and_or(&s->state, 0);
	if (st != SLOT_READY)
		return -1;
	if (s->key.chunk != k->chunk || !same_file(&s->key.file, &k->file))
		return 1;
	apply(&s->val, w, nw, bits, ev);
	return 0;
}

static __always_inline int update_map(void *map, const struct chunk_key *k, __u32 w, __u32 nw, __u64 bits,
				      __u32 ev)
{
	struct chunk_val *v = bpf_map_lookup_elem(map, k);

	if (!v) {
		struct chunk_val zero = {};

		bpf_map_update_elem(map, k, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(map, k);
		if (!v)
			return -1; /* map full */
	}
	apply(v, w, nw, bits, ev);
	return 0;
}

/* Record `bits` of one chunk in the active merge buffer. A global function, so the verifier checks it once
 * rather than at every call site of the per-chunk loop. */
__noinline int update_chunk(const struct chunk_key *k, __u32 w, __u32 nw, __u64 bits, __u32 ev)
{
	__u32 slot = CTL_ACTIVE;
	__u32 *active = bpf_map_lookup_elem(&ctl, &slot);
	int attempt, err = -1;

	if (!k || !active)
		return -1;
	for (attempt = 0; attempt < 2; attempt++) {
		__u32 idx = *(volatile __u32 *)active & 1;
		__u32 islot = INFLIGHT0 + idx;
		__u64 *busy = bpf_map_lookup_elem(&inflight, &islot);

		if (!busy)
			return -1;
		__sync_fetch_and_add(busy, 1);
		if ((*(volatile __u32 *)active & 1) != idx) {
			/* User space switched buffers between our read and our increment: it may already be
			 * draining `idx`, so write the new one instead. */
			__sync_fetch_and_sub(busy, 1);
			stat_add(STAT_RETRIES, 1);
			continue;
		}
		err = idx ? update_slot(&table1, k, w, nw, bits, ev) : update_slot(&table0, k, w, nw, bits, ev);
		if (err > 0) {
			stat_add(STAT_COLLISIONS, 1);
			err = idx ? update_map(&merge1, k, w, nw, bits, ev) : update_map(&merge0, k, w, nw, bits, ev);
		}
		__sync_fetch_and_sub(busy, 1);
		break;
	}
	return err;
}

/* Count pages that could not be recorded. Global, so the verifier need not track a running sum in the loop. */
__noinline int note_lost(const struct file_key *fk, __u64 pages, __u32 why)
{
	if (!fk)
		return 0;
	stat_add(why, pages);
	count_lost(fk, pages);
	return 0;
}

static __always_inline void record_folio(struct folio *folio, struct inode *inode, __u32 ev)
{
	struct chunk_key k = {};
	__u64 index, nr, first;
	__u32 order = 0;
	__u32 mask;
	int i;

	/* Only ADDED is skipped for our own process (and the run's other one): a REMOVED in our context may be
	 * reclaim of anyone's pages. */
	if (ev == DUET_ADDED && cfg.skip_added_tgid) {
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;

		if (tgid == cfg.skip_added_tgid || (cfg.skip_added_tgid2 && tgid == cfg.skip_added_tgid2))
			return;
	}
	mask = resolve(inode, &k.file,
		       ev == DUET_ADDED ? MEMO_ADDED : ev == DUET_REMOVED ? MEMO_REMOVED : MEMO_DIRTIED);
	if (!(mask & ev))
		return;
	/* folio_order(): large folios have PG_head set and keep the order in the low byte of _flags_1. */
	if (*(unsigned long *)&folio->flags & (1UL << bpf_core_enum_value(enum pageflags, PG_head)))
		order = folio->_flags_1 & 0xff;
	index = folio->index;
	nr = 1ULL << (order & 63);
	stat_add(STAT_EVENTS, 1);
	stat_add(STAT_PAGES, nr);

	/* Folios are naturally aligned: one smaller than a word lies within a word, one smaller than a chunk is
	 * whole words of one chunk. */
	if (order < CHUNK_SHIFT) {
		__u32 small = order < WORD_SHIFT;

		k.chunk = index >> CHUNK_SHIFT;
		if (update_chunk(&k, (index >> WORD_SHIFT) & (CHUNK_WORDS - 1), small ? 1 : nr >> WORD_SHIFT,
				 small ? ((1ULL << nr) - 1) << (index & (WORD_PAGES - 1)) : ~0ULL, ev))
			note_lost(&k.file, nr, STAT_LOST_MAP);
		return;
	}
	if (order > MAX_FOLIO_ORDER) {
		note_lost(&k.file, nr, STAT_LOST_FOLIO);
		return;
	}
	first = index >> CHUNK_SHIFT;
	nr >>= CHUNK_SHIFT;
	for (i = 0; i < MAX_FOLIO_CHUNKS; i++) {
		if (i >= nr)
			break;
		k.chunk = first + i;
		if (update_chunk(&k, 0, CHUNK_WORDS, ~0ULL, ev))
			note_lost(&k.file, CHUNK_PAGES, STAT_LOST_MAP);
	}
}

SEC("tp_btf/mm_filemap_add_to_page_cache")
int BPF_PROG(tp_btf_added, struct folio *folio)
{
	struct address_space *mapping = folio->mapping;

	if (mapping)
		record_folio(folio, mapping->host, DUET_ADDED);
	return 0;
}

SEC("tp_btf/mm_filemap_delete_from_page_cache")
int BPF_PROG(tp_btf_removed, struct folio *folio)
{
	/* Called before page_cache_delete() clears folio->mapping. */
	struct address_space *mapping = folio->mapping;

	if (mapping)
		record_folio(folio, mapping->host, DUET_REMOVED);
	return 0;
}

SEC("tp_btf/writeback_dirty_folio")
int BPF_PROG(tp_btf_dirtied, struct folio *folio, struct address_space *mapping)
{
	if (mapping)
		record_folio(folio, mapping->host, DUET_DIRTIED);
	return 0;
}

SEC("tp_btf/sb_clear_inode_writeback")
int BPF_PROG(tp_btf_flushed, struct inode *inode)
{
	struct flush_rec *rec;
	struct file_key fk = {};
	__u32 mask = resolve(inode, &fk, MEMO_FLUSHED);
	unsigned int xa_flags;

	if (!(mask & DUET_FLUSHED))
		return 0;
	xa_flags = inode->i_mapping->i_pages.xa_flags;
	rec = bpf_ringbuf_reserve(&flushes, sizeof(*rec), 0);
	if (!rec) {
		stat_add(STAT_LOST_RING, 1);
		count_lost(&fk, 1);
		return 0;
	}
	rec->file = fk;
	rec->ts_ns = bpf_ktime_get_ns();
	rec->exact = !(xa_flags & (1U << (cfg.dirty_mark_bit & 31)));
	rec->pad = 0;
	/* No wakeup: user space polls the ring at every drain; a wakeup per record would cost more than it saves. */
	bpf_ringbuf_submit(rec, BPF_RB_NO_WAKEUP);
	stat_add(STAT_FLUSHES, 1);
	return 0;
}
