// Text kernels of the data pipeline, called through ctypes from tokenizer/native.py (a plain C ABI:
// no torch, no Python headers, so the tokenising worker processes load it without importing torch).
//
// lw_chunks/lw_doc_lengths/lw_assemble: the word cache's hot loop (tokenizer/word_cache.py), the
// numpy passes of split_chunks, _packed, _hash, _probe and the id gather done in one pass each;
// lw_distinct/lw_place: its bookkeeping of new chunks (_distinct, _place).
// lw_isas: the ISAs lw_chunks can be asked for. lw_minhash: word-shingle MinHash signatures (data/dedup.py's minhash_signatures) from the
// texts' word hashes. lw_copy_runs: the mix's gather of documents' tokens (data/mix.py). Every result is the numpy path's, bit for bit (the tests compare them).
#include <cstdint>
#include <cstring>
#include <string_view>
#include <unordered_map>
#include <utility>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace {

// A cached chunk is a row in two arrays (word_cache.KEY, .SPAN): its key packed as (lo, hi), read by
// the probe, and its first id in the ids array and their count, read by the gather. A row of 16 bytes
// is one cache line where two arrays of 8 were two misses.
struct Key {
    uint64_t lo, hi;
};
struct Span {
    int64_t start, count;
};
static_assert(sizeof(Key) == 16 && sizeof(Span) == 16, "word_cache's KEY and SPAN rows are 16 bytes");

constexpr uint64_t MIX0 = 0x9E3779B97F4A7C15ull, MIX1 = 0xC2B2AE3D27D4EB4Full, MIX2 = 0xBF58476D1CE4E5B9ull;
constexpr int64_t SHORT_KEY = 15;  // word_cache._SHORT
// A table entry (word_cache._tag): the chunk in bits 0..39, bits 41..63 of its key's hash in bits 40..62.
constexpr int64_t CHUNK_BITS = (int64_t{1} << 40) - 1, TAG_BITS = ((int64_t{1} << 23) - 1) << 40;
constexpr int64_t LONG_KEY = -2;   // lw_chunks' `found` for a key over SHORT_KEY bytes (looked up in Python)

inline uint64_t low_bytes(const uint8_t* p, int64_t n) {  // the n <= 8 bytes at p, little-endian
    uint64_t v = 0;
    std::memcpy(&v, p, static_cast<size_t>(n));
    return v;
}

inline uint64_t load8(const uint8_t* p) {  // the 8 bytes at p, little-endian, one unaligned load
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

inline uint64_t low_mask(int64_t k) {  // the low k bytes (0 <= k <= 8) of a word
    return k >= 8 ? ~0ull : (1ull << (8 * k)) - 1;
}

// A chunk key's (lo, hi) as word_cache._packed: its first 8 bytes (zero-padded) in lo, the next ones
// and its length in hi. Where 16 bytes can be read at p, two whole loads and masks: low_bytes' copy of
// n bytes into a word, then reading the word, stalled on store forwarding (a quarter of lw_chunks).
inline void pack_key(const uint8_t* p, int64_t len, bool whole, uint64_t* lo, uint64_t* hi) {
    const int64_t tail = len > 15 ? 7 : len > 8 ? len - 8 : 0;  // key bytes in hi (a long key: its bytes 8..14)
    if (whole) {
        *lo = load8(p) & low_mask(len);
        *hi = (load8(p + 8) & low_mask(tail)) | static_cast<uint64_t>(len) << 56;
    } else {
        *lo = low_bytes(p, len < 8 ? len : 8);
        *hi = (tail ? low_bytes(p + 8, tail) : 0) | static_cast<uint64_t>(len) << 56;
    }
}

inline uint64_t slot_hash(uint64_t lo, uint64_t hi) {  // word_cache._hash
    uint64_t h = (lo * MIX0) ^ (hi * MIX1);
    h ^= h >> 29;
    h *= MIX2;
    return h ^ (h >> 32);
}

inline int64_t tag_of(uint64_t h) {  // a table entry's tag bits for a key hashing to h (word_cache._tag)
    return static_cast<int64_t>(h >> 41 << 40);
}

// lw_chunks' byte classes, as 64-bit masks per 64 bytes of a block: a bit for every byte that starts
// something (an event): the first space of a run, an isolated byte, a document's 0xFF. The portable
// masks read a table per byte and are the reference; the AVX2 and AVX-512BW ones compare 32 / 64
// bytes at a time, isolated bytes found by a nibble bitmap (two byte shuffles: exact for any set of
// ASCII bytes). tests/tokenizer/test_text_kernels.py runs every ISA this CPU has against numpy.
enum : int64_t { ISA_BEST = -1, ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
constexpr int64_t BLOCK = 4096;  // bytes classified per call: their masks stay in L1

struct Classes {
    uint8_t iso[256];      // 1 for an isolated byte (never the space or 0xFF, which are classes of their own)
    uint8_t nibbles[16];   // [low nibble]: bit h set when byte (h << 4 | low nibble) is isolated (h < 8)
    bool ascii_only;       // every isolated byte is ASCII: the nibble bitmap holds the whole set
    explicit Classes(const uint8_t* isolated) : nibbles{}, ascii_only(true) {
        for (int b = 0; b < 256; ++b) {
            iso[b] = (isolated[b] && b != 0x20 && b != 0xFF) ? 1 : 0;
            if (!iso[b]) continue;
            if (b < 0x80) nibbles[b & 15] |= static_cast<uint8_t>(1u << (b >> 4));
            else ascii_only = false;
        }
    }
};

// ev[w]: the events among bytes 64w .. 64w+63 of p[0:len] (len <= BLOCK; bits past len clear);
// *carry: whether the byte before p is a space, updated to p's last byte.
using MaskFn = void (*)(const uint8_t*, int64_t, const Classes&, uint64_t*, uint64_t*);

inline uint64_t first_of_runs(uint64_t space, uint64_t* carry) {  // the spaces not after a space
    const uint64_t runs = space & ~((space << 1) | *carry);
    *carry = space >> 63;
    return runs;
}

void masks_portable(const uint8_t* p, int64_t len, const Classes& cls, uint64_t* ev, uint64_t* carry) {
    for (int64_t w = 0; w * 64 < len; ++w) {
        const int64_t m = len - 64 * w < 64 ? len - 64 * w : 64;
        uint64_t space = 0, other = 0;
        for (int64_t j = 0; j < m; ++j) {
            const uint8_t b = p[64 * w + j];
            space |= static_cast<uint64_t>(b == 0x20) << j;
            other |= static_cast<uint64_t>(cls.iso[b] | (b == 0xFF)) << j;
        }
        ev[w] = first_of_runs(space, carry) | other;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) void masks_avx2(const uint8_t* p, int64_t len, const Classes& cls, uint64_t* ev,
                                                 uint64_t* carry) {
    const __m256i nibbles = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cls.nibbles)));
    const __m256i bits = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 0, 0, 0, 0, 0, 0, 0, 0,
                                          1, 2, 4, 8, 16, 32, 64, -128, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i low4 = _mm256_set1_epi8(0x0F), space = _mm256_set1_epi8(0x20), doc = _mm256_set1_epi8(-1);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t w = 0; w * 64 < len; ++w) {
        alignas(32) uint8_t tail[64];
        const uint8_t* q = p + 64 * w;
        const int64_t m = len - 64 * w < 64 ? len - 64 * w : 64;
        if (m < 64) {  // the block's last bytes: copied, padded with a byte of no class
            std::memset(tail, 'a', sizeof tail);
            std::memcpy(tail, q, static_cast<size_t>(m));
            q = tail;
        }
        uint64_t sp = 0, other = 0;
        for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * h));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            const __m256i hit = _mm256_and_si256(_mm256_shuffle_epi8(nibbles, lo), _mm256_shuffle_epi8(bits, hi));
            const uint32_t iso = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(hit, zero)));
            const uint32_t s = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, space)));
            const uint32_t d = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, doc)));
            sp |= static_cast<uint64_t>(s) << (32 * h);
            other |= static_cast<uint64_t>(iso | d) << (32 * h);
        }
        const uint64_t valid = m == 64 ? ~0ull : (1ull << m) - 1;
        ev[w] = (first_of_runs(sp & valid, carry) | other) & valid;
    }
}

__attribute__((target("avx512f,avx512bw"))) void masks_avx512(const uint8_t* p, int64_t len, const Classes& cls,
                                                              uint64_t* ev, uint64_t* carry) {
    const __m512i nibbles = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cls.nibbles)));
    const __m512i bits = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 0, 0, 0, 0, 0, 0, 0, 0));
    const __m512i low4 = _mm512_set1_epi8(0x0F), space = _mm512_set1_epi8(0x20), doc = _mm512_set1_epi8(-1);
    for (int64_t w = 0; w * 64 < len; ++w) {
        const int64_t m = len - 64 * w < 64 ? len - 64 * w : 64;
        const uint64_t valid = m == 64 ? ~0ull : (1ull << m) - 1;
        const __m512i v = _mm512_maskz_loadu_epi8(valid, p + 64 * w);  // past len: zeros, masked off below
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        const uint64_t iso = _mm512_test_epi8_mask(_mm512_shuffle_epi8(nibbles, lo), _mm512_shuffle_epi8(bits, hi));
        const uint64_t sp = _mm512_cmpeq_epi8_mask(v, space) & valid;
        const uint64_t d = _mm512_cmpeq_epi8_mask(v, doc);
        ev[w] = (first_of_runs(sp, carry) | iso | d) & valid;
    }
}
#endif

int64_t isas() {  // bit k: ISA k runs here
    static const int64_t have = [] {
        int64_t bits = 1 << ISA_PORTABLE;
#if defined(__x86_64__) && defined(__GNUC__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2")) bits |= 1 << ISA_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) bits |= 1 << ISA_AVX512;
#endif
        return bits;
    }();
    return have;
}

MaskFn mask_fn(const Classes& cls, int64_t isa) {  // nullptr: that isa is not available
    const int64_t have = isas();
    if (isa == ISA_BEST) isa = (have >> ISA_AVX512 & 1) ? ISA_AVX512 : (have >> ISA_AVX2 & 1) ? ISA_AVX2 : ISA_PORTABLE;
    if (isa < 0 || isa > ISA_AVX512 || !(have >> isa & 1)) return nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
    if (cls.ascii_only && isa == ISA_AVX512) return masks_avx512;
    if (cls.ascii_only && isa == ISA_AVX2) return masks_avx2;
#endif
    return masks_portable;  // also for a non-ASCII isolated byte, which the nibble bitmap cannot hold
}

}  // namespace

extern "C" {

// Bit k set: lw_chunks runs with isa k here (ISA_PORTABLE, ISA_AVX2, ISA_AVX512).
int64_t lw_isas() { return isas(); }

// Cut buf (documents each after "\xff ", "▁" already written as " ": word_cache._joined) into
// chunks as split_chunks does, pack each key as _packed does, probe the table as _probe does.
// Per chunk: key start and length in buf, (lo, hi), found (the cached chunk, -1 when not cached,
// LONG_KEY for a key of more than 15 bytes); per_text[t]: chunks of text t. The outputs hold at
// least n entries (a chunk starts at a distinct byte). isa: how the bytes are classified (ISA_*
// below; ISA_BEST picks the widest this CPU runs). Returns the number of chunks, -1 when buf does
// not hold `texts` documents, -3 for an isa this CPU or build cannot run.
int64_t lw_chunks(const uint8_t* buf, int64_t n, const uint8_t* isolated, int64_t texts, const int64_t* table,
                  int64_t mask, const Key* keys, int64_t* start, int64_t* length,
                  uint64_t* lo_out, uint64_t* hi_out, int64_t* found, int64_t* per_text, int64_t isa) {
    Classes cls(isolated);
    const MaskFn masks = mask_fn(cls, isa);
    if (masks == nullptr) return -3;
    if (n > 0 && buf[0] != 0xFF) return -1;  // every byte belongs to a document
    int64_t chunks = 0, text = -1, open = -1;  // open: the current chunk's key start, -1 when none
    // Pass 1, the cut: each chunk's key, packed, and its home slot (in `found` until pass 2).
    auto close = [&](int64_t end) {
        const int64_t len = end - open;
        uint64_t lo, hi;
        pack_key(buf + open, len, open + 16 <= n, &lo, &hi);
        start[chunks] = open;
        length[chunks] = len;
        lo_out[chunks] = lo;
        hi_out[chunks] = hi;
        found[chunks] = static_cast<int64_t>(slot_hash(lo, hi));  // its slot and tag, until pass 2 (a long key: unused)
        ++chunks;
        ++per_text[text];
    };
    // The bytes where something starts (events: masks_*), a block at a time, then a branch per
    // event rather than per byte: chunks average ~6 bytes, and the byte loop's switch mispredicted
    // at every chunk boundary (3.7 ns a byte).
    uint64_t ev[BLOCK / 64];
    uint64_t carry = 0;  // the byte before the block is a space
    int64_t skip = -1;   // the lone dummy-prefix space of an empty text: no chunk
    for (int64_t at = 0; at < n; at += BLOCK) {
        const int64_t len = n - at < BLOCK ? n - at : BLOCK;
        masks(buf + at, len, cls, ev, &carry);
        for (int64_t w = 0; w < (len + 63) / 64; ++w) {
            for (uint64_t m = ev[w]; m; m &= m - 1) {
                const int64_t i = at + 64 * w + __builtin_ctzll(m);
                if (i == skip) continue;
                const uint8_t b = buf[i];
                if (open >= 0) close(i);
                if (b == 0x20) {  // the first space of a run starts a chunk; its key is after it
                    open = i + 1;
                } else if (b == 0xFF) {  // a text starts after its dummy-prefix space
                    open = -1;
                    if (text + 1 == texts) return -1;  // more documents than texts: never from UTF-8
                    per_text[++text] = 0;
                    if (i + 2 >= n || buf[i + 2] == 0xFF) skip = i + 1;  // the empty text has no chunk
                } else {  // an isolated byte starts a chunk whose key starts with it
                    open = i;
                }
            }
        }
    }
    if (open >= 0) close(n);
    if (text + 1 != texts) return -1;  // buf did not hold `texts` documents
    // Passes 2 and 3, the probe, as separate loops over the chunks so that the table's and the keys'
    // cache misses overlap (each prefetched PREFETCH chunks ahead): one chunk's probe at a time
    // waited on two or three misses in turn, the cut's loop leaving no room to overlap them. A table
    // entry holds its chunk and a tag of its key's hash (word_cache._tag), so pass 2 walks the table
    // alone, slots holding other keys passed over by their tags, to one candidate per key, and pass 3
    // reads only the candidates' keys: reading the key of every chunk met on the way, one miss each
    // and not prefetched past the home slot, was a third of lw_chunks in a 1 GiB `data mix`.
    constexpr int64_t PREFETCH = 64;
    const uint64_t umask = static_cast<uint64_t>(mask);
    for (int64_t c = 0; c < chunks; ++c) {  // key hash -> a candidate chunk (its tag's), or -1
        if (c + PREFETCH < chunks) __builtin_prefetch(table + (found[c + PREFETCH] & mask));
        if (length[c] > SHORT_KEY) { found[c] = LONG_KEY; continue; }  // not in the table: looked up by its bytes
        const uint64_t h = static_cast<uint64_t>(found[c]);
        const int64_t tag = tag_of(h);
        int64_t entry;
        for (uint64_t slot = h & umask;; slot = (slot + 1) & umask) {  // linear probing
            entry = table[slot];
            if (entry < 0 || (entry & TAG_BITS) == tag) break;
        }
        found[c] = entry < 0 ? -1 : entry & CHUNK_BITS;
    }
    for (int64_t c = 0; c < chunks; ++c) {  // the candidate holds this key (once in 2^23 not: probe again)
        if (c + PREFETCH < chunks && found[c + PREFETCH] >= 0) __builtin_prefetch(keys + found[c + PREFETCH]);
        int64_t hit = found[c];
        if (hit < 0 || (keys[hit].lo == lo_out[c] && keys[hit].hi == hi_out[c])) continue;  // found, a miss, long
        const uint64_t h = slot_hash(lo_out[c], hi_out[c]);
        const int64_t tag = tag_of(h);
        for (uint64_t slot = h & umask;; slot = (slot + 1) & umask) {  // every key of the tag compared
            const int64_t entry = table[slot];
            if (entry < 0) { hit = -1; break; }
            hit = entry & CHUNK_BITS;
            if ((entry & TAG_BITS) == tag && keys[hit].lo == lo_out[c] && keys[hit].hi == hi_out[c]) break;
        }
        found[c] = hit;
    }
    return chunks;
}

namespace {
int64_t all_chunks(const int64_t* per_text, int64_t texts) {
    int64_t all = 0;
    for (int64_t t = 0; t < texts; ++t) all += per_text[t];
    return all;
}
}  // namespace

// Each text's id count (its chunks' counts, plus `marks` for <s> and </s>); returns their sum.
int64_t lw_doc_lengths(const int64_t* found, const int64_t* per_text, int64_t texts, const Span* spans,
                       int64_t marks, int64_t* lengths) {
    const int64_t chunks = all_chunks(per_text, texts);
    int64_t total = 0, c = 0;
    for (int64_t t = 0; t < texts; ++t) {
        int64_t len = marks;
        for (int64_t k = 0; k < per_text[t]; ++k, ++c) {
            if (c + 64 < chunks) __builtin_prefetch(spans + found[c + 64]);
            len += spans[found[c]].count;
        }
        lengths[t] = len;
        total += len;
    }
    return total;
}

extern "C++" {  // a template: C++ linkage inside the C block
namespace {
template <typename Out>
int64_t assemble(const int64_t* found, const int64_t* per_text, int64_t texts, const Span* spans, const int32_t* tokens,
                 int64_t with_bos, int64_t bos, int64_t with_eos, int64_t eos, Out* out, int64_t capacity,
                 int64_t* lengths) {
    const int64_t chunks = all_chunks(per_text, texts);
    Out* const first = out;
    int64_t c = 0;
    for (int64_t t = 0; t < texts; ++t) {
        Out* const doc = out;
        if (out - first + with_bos + with_eos > capacity) return -2;  // room checked before every write
        if (with_bos) *out++ = static_cast<Out>(bos);
        for (int64_t k = 0; k < per_text[t]; ++k, ++c) {
            // Two steps ahead: a chunk's span 64 chunks ahead, its ids 32 ahead (their span read by then).
            // Reading the span for the ids' prefetch, a miss, stalled the loop.
            if (c + 64 < chunks) __builtin_prefetch(spans + found[c + 64]);
            if (c + 32 < chunks) __builtin_prefetch(tokens + spans[found[c + 32]].start);
            const Span& span = spans[found[c]];
            if (out - first + span.count + with_eos > capacity) return -2;
            const int32_t* ids = tokens + span.start;
            for (int64_t j = 0, m = span.count; j < m; ++j) *out++ = static_cast<Out>(ids[j]);
        }
        if (with_eos) *out++ = static_cast<Out>(eos);
        lengths[t] = out - doc;
    }
    return out - first;
}
}  // namespace
}  // extern "C++"

// Every text's ids: bos (when with_bos), its chunks' cached ids in order, eos (when with_eos), written
// as `itemsize`-byte integers (2: uint16, 4: int32, 8: int64; the caller knows every id fits), and each
// text's count into lengths. Writing the shards' uint16 here spares `prepare` an int64 array four times
// the size and a conversion; counting as it writes spares a pass over the chunks' spans (random reads)
// to size `out` first: the caller gives room for `capacity` ids, a bound (word_cache: one id per byte).
// Returns the ids written, -1 for another itemsize, -2 when they would pass `capacity` (nothing past it
// is written; the caller sizes `out` with lw_doc_lengths and calls again).
int64_t lw_assemble(const int64_t* found, const int64_t* per_text, int64_t texts, const Span* spans,
                    const int32_t* tokens, int64_t with_bos, int64_t bos, int64_t with_eos, int64_t eos, void* out,
                    int64_t itemsize, int64_t capacity, int64_t* lengths) {
    auto run = [&](auto* typed) {
        return assemble(found, per_text, texts, spans, tokens, with_bos, bos, with_eos, eos, typed, capacity, lengths);
    };
    switch (itemsize) {
        case 2: return run(static_cast<uint16_t*>(out));
        case 4: return run(static_cast<int32_t*>(out));
        case 8: return run(static_cast<int64_t*>(out));
        default: return -1;
    }
}

// word_cache.FlatEncoder._place's insertion: each of `n` chunks (short keys, distinct, not in the table)
// into the first empty slot from its key's home slot (linear probing), with its tag, in order. The numpy
// rounds (each free slot to its first claimant, the others one slot on) may lay the table out otherwise;
// every lookup answers the same. The home slots 16 chunks ahead are prefetched (the table is tens of MB).
void lw_place(int64_t* table, int64_t mask, const Key* keys, const int64_t* chunks, int64_t n) {
    const uint64_t umask = static_cast<uint64_t>(mask);
    constexpr int64_t AHEAD = 16;
    for (int64_t i = 0; i < n; ++i) {
        if (i + AHEAD < n) {
            const Key& ahead = keys[chunks[i + AHEAD]];
            __builtin_prefetch(table + (slot_hash(ahead.lo, ahead.hi) & umask), 1);
        }
        const Key& key = keys[chunks[i]];
        const uint64_t h = slot_hash(key.lo, key.hi);
        uint64_t slot = h & umask;
        while (table[slot] >= 0) slot = (slot + 1) & umask;
        table[slot] = chunks[i] | tag_of(h);
    }
}

// word_cache._distinct: of the chunks `chunks` (positions into start/length/lo/hi, increasing), the first
// holding each distinct key, in order (rows), and for each chunk its key's index in rows (which). Short
// keys (<= SHORT_KEY bytes) are told apart by (lo, hi), exact (word_cache._packed); longer ones by their
// bytes. Returns the number of rows.
int64_t lw_distinct(const uint8_t* buf, const int64_t* start, const int64_t* length, const uint64_t* lo,
                    const uint64_t* hi, const int64_t* chunks, int64_t n, int64_t* rows, int64_t* which) {
    struct PairHash {
        size_t operator()(const std::pair<uint64_t, uint64_t>& k) const { return slot_hash(k.first, k.second); }
    };
    std::unordered_map<std::pair<uint64_t, uint64_t>, int64_t, PairHash> shorts;
    std::unordered_map<std::string_view, int64_t> longs;
    shorts.reserve(static_cast<size_t>(n));
    int64_t distinct = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t c = chunks[i];
        int64_t k;
        bool added;
        if (length[c] <= SHORT_KEY) {
            const auto got = shorts.emplace(std::make_pair(lo[c], hi[c]), distinct);
            k = got.first->second, added = got.second;
        } else {
            const auto key = std::string_view(reinterpret_cast<const char*>(buf) + start[c], static_cast<size_t>(length[c]));
            const auto got = longs.emplace(key, distinct);
            k = got.first->second, added = got.second;
        }
        if (added) rows[distinct++] = c;
        which[i] = k;
    }
    return distinct;
}

// The mix's gather (data/mix.py): dst[dst_at[r]:][:count[r]] = src[src_at[r]:][:count[r]] for every run r,
// in items of `itemsize` bytes: one memcpy per document instead of an index per token.
void lw_copy_runs(const uint8_t* src, const int64_t* src_at, const int64_t* count, const int64_t* dst_at,
                  int64_t runs, int64_t itemsize, uint8_t* dst) {
    for (int64_t r = 0; r < runs; ++r)
        std::memcpy(dst + dst_at[r] * itemsize, src + src_at[r] * itemsize, static_cast<size_t>(count[r] * itemsize));
}

// MinHash signatures as data/dedup.py's minhash_signatures: word_hash holds every text's word
// hashes back to back (words[t] of text t, short texts already padded to n words); shingle s of a
// text is mix32(sum_k word_hash[s + k] * mult[k]), and signature[t][p] = (min over the text's
// shingles of a[p] * h + b[p]) >> 32 (uint64 arithmetic, wrapping). A text with no shingle keeps
// all-ones. sig: (texts, perms) uint32.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))  // v4: AVX-512DQ vpmullq
#endif
void lw_minhash(const uint64_t* word_hash, const int64_t* words, int64_t texts, const uint64_t* mult, int64_t n,
                const uint64_t* a, const uint64_t* b, int64_t perms, uint64_t* scratch, uint32_t* sig) {
    int64_t base = 0;
    for (int64_t t = 0; t < texts; ++t) {
        uint64_t* low = scratch;  // (perms,) the running minima of text t
        for (int64_t p = 0; p < perms; ++p) low[p] = ~0ull;
        const int64_t grams = words[t] >= n ? words[t] - n + 1 : 0;
        for (int64_t s = 0; s < grams; ++s) {
            uint64_t g = 0;
            for (int64_t k = 0; k < n; ++k) g += word_hash[base + s + k] * mult[k];
            g ^= g >> 30;
            g *= 0xBF58476D1CE4E5B9ull;
            g ^= g >> 27;
            g *= 0x94D049BB133111EBull;
            g ^= g >> 31;
            const uint64_t h = g >> 32;
            for (int64_t p = 0; p < perms; ++p) {
                const uint64_t x = a[p] * h + b[p];
                low[p] = x < low[p] ? x : low[p];
            }
        }
        uint32_t* row = sig + t * perms;
        for (int64_t p = 0; p < perms; ++p) row[p] = static_cast<uint32_t>(low[p] >> 32);
        base += words[t];
    }
}

}  // extern "C"
