// Text kernels of the data pipeline, called through ctypes from tokenizer/native.py (a plain C ABI:
// no torch, no Python headers, so the tokenising worker processes load it without importing torch).
//
// lw_chunks/lw_doc_lengths/lw_assemble: the word cache's hot loop (tokenizer/word_cache.py), the
// numpy passes of split_chunks, _packed, _hash, _probe and the id gather done in one pass each.
// lw_minhash: word-shingle MinHash signatures (data/dedup.py's minhash_signatures) from the
// texts' word hashes. lw_copy_runs: the mix's gather of documents' tokens (data/mix.py). Every result is the numpy path's, bit for bit (the tests compare them).
#include <cstdint>
#include <cstring>

namespace {

constexpr uint64_t MIX0 = 0x9E3779B97F4A7C15ull, MIX1 = 0xC2B2AE3D27D4EB4Full, MIX2 = 0xBF58476D1CE4E5B9ull;
constexpr int64_t SHORT_KEY = 15;  // word_cache._SHORT
constexpr int64_t LONG_KEY = -2;   // lw_chunks' `found` for a key over SHORT_KEY bytes (looked up in Python)

inline uint64_t low_bytes(const uint8_t* p, int64_t n) {  // the n <= 8 bytes at p, little-endian
    uint64_t v = 0;
    std::memcpy(&v, p, static_cast<size_t>(n));
    return v;
}

inline uint64_t slot_hash(uint64_t lo, uint64_t hi) {  // word_cache._hash
    uint64_t h = (lo * MIX0) ^ (hi * MIX1);
    h ^= h >> 29;
    h *= MIX2;
    return h ^ (h >> 32);
}

enum : uint8_t { PLAIN = 0, SPACE = 1, ISOLATED = 2, DOC = 3 };

}  // namespace

extern "C" {

// Cut buf (documents each after "\xff ", "▁" already written as " ": word_cache._joined) into
// chunks as split_chunks does, pack each key as _packed does, probe the table as _probe does.
// Per chunk: key start and length in buf, (lo, hi), found (the cached chunk, -1 when not cached,
// LONG_KEY for a key of more than 15 bytes); per_text[t]: chunks of text t. The outputs hold at
// least n entries (a chunk starts at a distinct byte). Returns the number of chunks.
int64_t lw_chunks(const uint8_t* buf, int64_t n, const uint8_t* isolated, int64_t texts, const int64_t* table,
                  int64_t mask, const uint64_t* key_lo, const uint64_t* key_hi, int64_t* start, int64_t* length,
                  uint64_t* lo_out, uint64_t* hi_out, int64_t* found, int64_t* per_text) {
    uint8_t kind[256];
    for (int b = 0; b < 256; ++b) kind[b] = isolated[b] ? ISOLATED : PLAIN;
    kind[0x20] = SPACE;
    kind[0xFF] = DOC;
    int64_t chunks = 0, text = -1, open = -1;  // open: the current chunk's key start, -1 when none
    // Pass 1, the cut: each chunk's key, packed, and its home slot (in `found` until pass 2).
    auto close = [&](int64_t end) {
        const int64_t len = end - open;
        const uint8_t* p = buf + open;
        uint64_t lo, hi;
        int64_t slot = LONG_KEY;
        if (len <= SHORT_KEY) {
            lo = low_bytes(p, len < 8 ? len : 8);
            hi = (len > 8 ? low_bytes(p + 8, len - 8) : 0) | static_cast<uint64_t>(len) << 56;
            slot = static_cast<int64_t>(slot_hash(lo, hi) & static_cast<uint64_t>(mask));
        } else {  // not in the table: word_cache looks it up by its bytes
            lo = low_bytes(p, 8);
            hi = low_bytes(p + 8, 7) | static_cast<uint64_t>(len) << 56;
        }
        start[chunks] = open;
        length[chunks] = len;
        lo_out[chunks] = lo;
        hi_out[chunks] = hi;
        found[chunks] = slot;
        ++chunks;
        ++per_text[text];
    };
    uint8_t prev = 0xFF;
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t b = buf[i];
        switch (kind[b]) {
            case PLAIN:
                break;
            case SPACE:
                if (prev != 0x20) {  // the first space of a run starts a chunk; its key is after it
                    if (open >= 0) close(i);
                    open = i + 1;
                }
                break;
            case ISOLATED:  // starts a chunk whose key starts with it
                if (open >= 0) close(i);
                open = i;
                break;
            default:  // DOC: a text starts after its dummy-prefix space; the empty text has no chunk
                if (open >= 0) close(i);
                open = -1;
                if (text + 1 == texts) return -1;  // more documents than texts: never from UTF-8
                per_text[++text] = 0;
                if (i + 2 >= n || buf[i + 2] == 0xFF) {
                    i += 1;  // skip the empty text's lone space
                    prev = 0x20;
                    continue;
                }
                break;
        }
        prev = b;
    }
    if (open >= 0) close(n);
    if (text + 1 != texts) return -1;  // buf did not hold `texts` documents
    // Passes 2 and 3, the probe, as separate loops over the chunks so that the table's and the keys'
    // cache misses overlap (each prefetched PREFETCH chunks ahead): one chunk's probe at a time
    // waited on two or three misses in turn, the cut's loop leaving no room to overlap them.
    constexpr int64_t PREFETCH = 16;
    for (int64_t c = 0; c < chunks; ++c) {  // home slot -> the chunk in it (-1: empty)
        if (c + PREFETCH < chunks && found[c + PREFETCH] >= 0) __builtin_prefetch(table + found[c + PREFETCH]);
        if (found[c] >= 0) found[c] = table[found[c]];
        else found[c] = LONG_KEY - 1;  // a long key, told apart from an empty slot's -1 until pass 3
    }
    for (int64_t c = 0; c < chunks; ++c) {  // the chunk in the home slot holds this key, or probe on
        if (c + PREFETCH < chunks && found[c + PREFETCH] >= 0) {
            __builtin_prefetch(key_lo + found[c + PREFETCH]);
            __builtin_prefetch(key_hi + found[c + PREFETCH]);
        }
        int64_t hit = found[c];
        if (hit == LONG_KEY - 1) { found[c] = LONG_KEY; continue; }
        if (hit < 0 || (key_lo[hit] == lo_out[c] && key_hi[hit] == hi_out[c])) continue;  // a miss, or found
        uint64_t slot = slot_hash(lo_out[c], hi_out[c]) & static_cast<uint64_t>(mask);
        for (;;) {  // linear probing past the home slot, another key's
            slot = (slot + 1) & static_cast<uint64_t>(mask);
            hit = table[slot];
            if (hit < 0 || (key_lo[hit] == lo_out[c] && key_hi[hit] == hi_out[c])) break;
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
int64_t lw_doc_lengths(const int64_t* found, const int64_t* per_text, int64_t texts, const int64_t* count,
                       int64_t marks, int64_t* lengths) {
    const int64_t chunks = all_chunks(per_text, texts);
    int64_t total = 0, c = 0;
    for (int64_t t = 0; t < texts; ++t) {
        int64_t len = marks;
        for (int64_t k = 0; k < per_text[t]; ++k, ++c) {
            if (c + 16 < chunks) __builtin_prefetch(count + found[c + 16]);
            len += count[found[c]];
        }
        lengths[t] = len;
        total += len;
    }
    return total;
}

// Every text's ids: bos (when with_bos), its chunks' cached ids in order, eos (when with_eos).
void lw_assemble(const int64_t* found, const int64_t* per_text, int64_t texts, const int64_t* first,
                 const int64_t* count, const int32_t* tokens, int64_t with_bos, int64_t bos, int64_t with_eos,
                 int64_t eos, int64_t* out) {
    const int64_t chunks = all_chunks(per_text, texts);
    int64_t c = 0;
    for (int64_t t = 0; t < texts; ++t) {
        if (with_bos) *out++ = bos;
        for (int64_t k = 0; k < per_text[t]; ++k, ++c) {
            if (c + 16 < chunks) __builtin_prefetch(tokens + first[found[c + 16]]);  // first[]: warm from the pass before
            const int32_t* ids = tokens + first[found[c]];
            for (int64_t j = 0, m = count[found[c]]; j < m; ++j) *out++ = ids[j];
        }
        if (with_eos) *out++ = eos;
    }
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
