// JSONL lines to the word cache's buffer, for `prepare` and `data mix` (data/shards.py, _encode): what
// parse_line, _document_of, the val split's hash and word_cache._joined do per document in Python
// (~3.7 us of interpreter per document, a quarter of a worker's CPU in a 1 GiB mix), in one pass.
//
// lw_jsonl_docs reads whole lines of a span and, for each JSON object line, writes
//   0xFF, " ", its `text` field's UTF-8 with every U+2581 as " "     (word_cache._joined)
// for a document whose text holds a non-whitespace character (str.isspace's set), counts the others as
// empty, and gives each kept document its val flag (blake2b-64 of "{seed}\0{id}" below a threshold, as
// shards._val_mask) and its source (the record's `source`, or the file's). It is exact where it answers
// and answers only where that is sure: a line it does not fully understand (invalid JSON or UTF-8, a
// lone surrogate, a key met twice, an `id` that is a float, a bool or past 18 digits, a `source` not a
// string, nesting past 64 levels) stops it, and the caller hands that line to the Python path, which
// parses it or names its error. The tests compare both paths on generated and hostile lines.
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <string>
#include <unordered_map>
#include <vector>

extern "C" int64_t lw_isas();

namespace {

// ---------------------------------------------------------------------------- BLAKE2b (RFC 7693)

constexpr uint64_t IV[8] = {0x6a09e667f3bcc908ull, 0xbb67ae8584caa73bull, 0x3c6ef372fe94f82bull,
                            0xa54ff53a5f1d36f1ull, 0x510e527fade682d1ull, 0x9b05688c2b3e6c1full,
                            0x1f83d9abfb41bd6bull, 0x5be0cd19137e2179ull};
constexpr uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

inline uint64_t load_le(const uint8_t* p) {  // portable: the compiler makes it one load on little-endian hosts
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = v << 8 | p[i];
    return v;
}

void compress(uint64_t h[8], const uint8_t* block, uint64_t bytes, bool last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; ++i) m[i] = load_le(block + 8 * i);
    for (int i = 0; i < 8; ++i) v[i] = h[i], v[i + 8] = IV[i];
    v[12] ^= bytes;  // the counter's high word stays 0: no input here nears 2**64 bytes
    if (last) v[14] = ~v[14];
    auto g = [&v](int a, int b, int c, int d, uint64_t x, uint64_t y) {
        v[a] += v[b] + x, v[d] = rotr(v[d] ^ v[a], 32), v[c] += v[d], v[b] = rotr(v[b] ^ v[c], 24);
        v[a] += v[b] + y, v[d] = rotr(v[d] ^ v[a], 16), v[c] += v[d], v[b] = rotr(v[b] ^ v[c], 63);
    };
    for (const auto& s : SIGMA) {
        g(0, 4, 8, 12, m[s[0]], m[s[1]]), g(1, 5, 9, 13, m[s[2]], m[s[3]]);
        g(2, 6, 10, 14, m[s[4]], m[s[5]]), g(3, 7, 11, 15, m[s[6]], m[s[7]]);
        g(0, 5, 10, 15, m[s[8]], m[s[9]]), g(1, 6, 11, 12, m[s[10]], m[s[11]]);
        g(2, 7, 8, 13, m[s[12]], m[s[13]]), g(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
}

// hashlib.blake2b(data, digest_size=8).digest() read as a little-endian uint64 (shards._split_digest).
uint64_t blake2b_64(const uint8_t* p, size_t n) {
    uint64_t h[8];
    std::memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ull ^ 8;  // parameter block: digest length 8, no key, fanout and depth 1
    uint64_t done = 0;
    for (; n > 128; p += 128, n -= 128) compress(h, p, done += 128, false);
    uint8_t last[128] = {};
    std::memcpy(last, p, n);
    compress(h, last, done + n, true);
    return h[0];
}

// ---------------------------------------------------------------------------- JSON

// str.isspace() of one code point (Python's set: bidirectional WS, B or S, or category Zs).
inline bool is_space(uint32_t c) {
    if (c < 0x80) return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20);
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

constexpr uint32_t LOWER_ONE = 0x2581;  // "▁": the same as " " to SentencePiece (word_cache's docstring)
constexpr int MAX_DEPTH = 64;           // deeper nesting goes to Python (json's own recursion limit, its error)

inline uint64_t has_zero(uint64_t w) { return (w - 0x0101010101010101ull) & ~w & 0x8080808080808080ull; }

// The run of plain bytes at p, at most n: bytes a string scan copies as they are, not '"', '\\', a control
// byte (< 0x20) or a non-ASCII one. Most of a text: found 8 bytes at a time (portable), 32 (AVX2) or 64
// (AVX-512BW). tests/data/test_jsonl_documents.py runs each ISA this CPU has against Python.
// The numbering and the CPU check of text_kernels.cpp's lw_isas (bit k: ISA k runs here), in the same library.
enum : int64_t { ISA_BEST = -1, ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
using PlainFn = size_t (*)(const uint8_t*, size_t);

size_t plain_portable(const uint8_t* p, size_t n) {
    const uint64_t ones = 0x0101010101010101ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        std::memcpy(&w, p + i, 8);
        // (w - 0x20..) & ~w: a byte below 0x20 (exact as a test of any: no borrow reaches a byte >= 0x20)
        const uint64_t special = has_zero(w ^ (ones * '"')) | has_zero(w ^ (ones * '\\')) | ((w - ones * 0x20) & ~w) | w;
        if (special & 0x8080808080808080ull) break;
    }
    while (i < n && p[i] >= 0x20 && p[i] < 0x80 && p[i] != '"' && p[i] != '\\') ++i;
    return i;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) size_t plain_avx2(const uint8_t* p, size_t n) {
    const __m256i quote = _mm256_set1_epi8('"'), backslash = _mm256_set1_epi8('\\'), control = _mm256_set1_epi8(0x1F);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
        const __m256i low = _mm256_cmpeq_epi8(_mm256_max_epu8(v, control), control);  // v <= 0x1F
        const __m256i hit = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(v, quote), _mm256_cmpeq_epi8(v, backslash)), low);
        const uint32_t m = static_cast<uint32_t>(_mm256_movemask_epi8(hit)) | static_cast<uint32_t>(_mm256_movemask_epi8(v));
        if (m) return i + __builtin_ctz(m);
    }
    return i + plain_portable(p + i, n - i);
}

__attribute__((target("avx512f,avx512bw"))) size_t plain_avx512(const uint8_t* p, size_t n) {
    const __m512i quote = _mm512_set1_epi8('"'), backslash = _mm512_set1_epi8('\\'), control = _mm512_set1_epi8(0x1F);
    for (size_t i = 0; i < n; i += 64) {
        const uint64_t valid = n - i >= 64 ? ~0ull : (1ull << (n - i)) - 1;
        const __m512i v = _mm512_maskz_loadu_epi8(valid, p + i);  // past n: zeros (control bytes), masked off
        const uint64_t m = (_mm512_cmpeq_epi8_mask(v, quote) | _mm512_cmpeq_epi8_mask(v, backslash) |
                            _mm512_cmple_epu8_mask(v, control) | _mm512_movepi8_mask(v)) & valid;
        if (m) return i + __builtin_ctzll(m);
    }
    return n;
}
#endif

PlainFn plain_fn(int64_t isa) {  // nullptr: that isa does not run here
    const int64_t have = lw_isas();
    if (isa == ISA_BEST) isa = (have >> ISA_AVX512 & 1) ? ISA_AVX512 : (have >> ISA_AVX2 & 1) ? ISA_AVX2 : ISA_PORTABLE;
    if (isa < 0 || isa > ISA_AVX512 || !(have >> isa & 1)) return nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == ISA_AVX512) return plain_avx512;
    if (isa == ISA_AVX2) return plain_avx2;
#endif
    return plain_portable;
}

// Where a decoded string goes: nowhere (a value skipped, only checked), a std::string (keys, ids,
// sources), or the text buffer ("▁" as " ", and whether a non-space character was met).
struct Discard {
    void bytes(const uint8_t*, size_t) {}
    void code(uint32_t, const uint8_t*, size_t) {}
};
struct ToString {
    std::string* s;
    void bytes(const uint8_t* p, size_t n) { s->append(reinterpret_cast<const char*>(p), n); }
    void code(uint32_t, const uint8_t* p, size_t n) { bytes(p, n); }
};
struct ToText {
    uint8_t* out;
    bool nonspace = false;
    void bytes(const uint8_t* p, size_t n) {  // ASCII bytes without '"', '\\' or control bytes
        std::memcpy(out, p, n);
        out += n;
        for (size_t i = 0; !nonspace && i < n; ++i) nonspace = !is_space(p[i]);
    }
    void code(uint32_t c, const uint8_t* p, size_t n) {  // one character, p its UTF-8
        nonspace = nonspace || !is_space(c);
        if (c == LOWER_ONE) {
            *out++ = ' ';
        } else {
            std::memcpy(out, p, n);
            out += n;
        }
    }
};

inline size_t utf8_of(uint32_t c, uint8_t* b) {
    if (c < 0x80) return b[0] = static_cast<uint8_t>(c), 1;
    if (c < 0x800) return b[0] = 0xC0 | c >> 6, b[1] = 0x80 | (c & 0x3F), 2;
    if (c < 0x10000) return b[0] = 0xE0 | c >> 12, b[1] = 0x80 | (c >> 6 & 0x3F), b[2] = 0x80 | (c & 0x3F), 3;
    b[0] = 0xF0 | c >> 18, b[1] = 0x80 | (c >> 12 & 0x3F), b[2] = 0x80 | (c >> 6 & 0x3F), b[3] = 0x80 | (c & 0x3F);
    return 4;
}

// A well-formed UTF-8 sequence of 2-4 bytes at p (p[0] >= 0x80) before e: its length (its code point in
// *c), or 0. Surrogates (ED A0..BF) are not well-formed: json reads them (surrogatepass), the text then
// cannot be encoded; the Python path raises that.
inline int utf8_seq(const uint8_t* p, const uint8_t* e, uint32_t* c) {
    const uint8_t b = p[0];
    int n;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) n = 2, *c = b & 0x1F;
    else if (b >= 0xE0 && b <= 0xEF) n = 3, *c = b & 0x0F, lo = b == 0xE0 ? 0xA0 : 0x80, hi = b == 0xED ? 0x9F : 0xBF;
    else if (b >= 0xF0 && b <= 0xF4) n = 4, *c = b & 0x07, lo = b == 0xF0 ? 0x90 : 0x80, hi = b == 0xF4 ? 0x8F : 0xBF;
    else return 0;
    if (e - p < n || p[1] < lo || p[1] > hi) return 0;
    *c = *c << 6 | (p[1] & 0x3F);
    for (int i = 2; i < n; ++i) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        *c = *c << 6 | (p[i] & 0x3F);
    }
    return n;
}

inline int hex4(const uint8_t* p) {  // the 4 hex digits at p, or -1
    int v = 0;
    for (int i = 0; i < 4; ++i) {
        const uint8_t c = p[i];
        const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v << 4 | d;
    }
    return v;
}

struct Parser {
    const uint8_t* p;  // the next byte of the line
    const uint8_t* e;  // the line's end
    PlainFn plain;

    void ws() {
        while (p < e && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) ++p;
    }

    // The string at p (its opening '"') into sink; false where the Python path must decide.
    template <class Sink>
    bool string(Sink& sink) {
        ++p;
        for (;;) {
            const size_t run = plain(p, static_cast<size_t>(e - p));
            if (run) {
                sink.bytes(p, run);
                p += run;
            }
            if (p >= e) return false;  // no closing quote on the line
            const uint8_t c = *p;
            if (c == '"') {
                ++p;
                return true;
            }
            if (c < 0x20) return false;  // a raw control character: invalid JSON
            if (c >= 0x80) {
                uint32_t code;
                const int n = utf8_seq(p, e, &code);
                if (!n) return false;
                sink.code(code, p, n);
                p += n;
            } else if (c != '\\') {
                sink.bytes(p, 1);
                ++p;
            } else if (!escape(sink)) {
                return false;
            }
        }
    }

    template <class Sink>
    bool escape(Sink& sink) {  // p at a backslash
        if (e - p < 2) return false;
        static const uint8_t simple[][2] = {{'"', '"'}, {'\\', '\\'}, {'/', '/'}, {'b', '\b'},
                                            {'f', '\f'}, {'n', '\n'}, {'r', '\r'}, {'t', '\t'}};
        for (const auto& s : simple) {
            if (p[1] == s[0]) {
                uint8_t b = s[1];
                sink.code(b, &b, 1);  // code(): a control character decoded counts for the space test
                p += 2;
                return true;
            }
        }
        if (p[1] != 'u' || e - p < 6) return false;
        int c = hex4(p + 2);
        if (c < 0 || (c >= 0xDC00 && c <= 0xDFFF)) return false;  // a lone low surrogate
        p += 6;
        if (c >= 0xD800 && c <= 0xDBFF) {  // a high surrogate: a low one must follow
            if (e - p < 6 || p[0] != '\\' || p[1] != 'u') return false;
            const int low = hex4(p + 2);
            if (low < 0xDC00 || low > 0xDFFF) return false;
            c = 0x10000 + ((c - 0xD800) << 10) + (low - 0xDC00);
            p += 6;
        }
        uint8_t b[4];
        sink.code(static_cast<uint32_t>(c), b, utf8_of(static_cast<uint32_t>(c), b));
        return true;
    }

    // A number at p: its span; *integer is whether it has neither fraction nor exponent.
    bool number(const uint8_t** start, bool* integer) {
        *start = p;
        if (p < e && *p == '-') ++p;
        if (p >= e || *p < '0' || *p > '9') return false;
        if (*p == '0') ++p;
        else while (p < e && *p >= '0' && *p <= '9') ++p;
        *integer = true;
        if (p < e && *p == '.') {
            *integer = false;
            if (++p >= e || *p < '0' || *p > '9') return false;
            while (p < e && *p >= '0' && *p <= '9') ++p;
        }
        if (p < e && (*p == 'e' || *p == 'E')) {
            *integer = false;
            if (++p < e && (*p == '+' || *p == '-')) ++p;
            if (p >= e || *p < '0' || *p > '9') return false;
            while (p < e && *p >= '0' && *p <= '9') ++p;
        }
        return true;
    }

    bool literal(const char* word, size_t n) {
        if (static_cast<size_t>(e - p) < n || std::memcmp(p, word, n)) return false;
        p += n;
        return true;
    }

    bool value(int depth) {  // any JSON value at p, checked and skipped
        if (p >= e) return false;
        Discard none;
        const uint8_t c = *p;
        if (c == '"') return string(none);
        if (c == 't') return literal("true", 4);
        if (c == 'f') return literal("false", 5);
        if (c == 'n') return literal("null", 4);
        if (c == '-' || (c >= '0' && c <= '9')) {
            const uint8_t* start;
            bool integer;
            return number(&start, &integer);
        }
        if ((c != '[' && c != '{') || depth >= MAX_DEPTH) return false;
        const uint8_t close = c == '[' ? ']' : '}';
        ++p;
        ws();
        if (p < e && *p == close) return ++p, true;
        for (;;) {
            if (close == '}') {
                if (p >= e || *p != '"' || !string(none)) return false;
                ws();
                if (p >= e || *p != ':') return false;
                ++p;
                ws();
            }
            if (!value(depth + 1)) return false;
            ws();
            if (p >= e) return false;
            if (*p == close) return ++p, true;
            if (*p != ',') return false;
            ++p;
            ws();
        }
    }
};

inline bool blank(const uint8_t* p, const uint8_t* e) {  // bytes.isspace() or empty: raw_lines skips the line
    for (; p < e; ++p)
        if (!(*p == ' ' || (*p >= '\t' && *p <= '\r'))) return false;
    return true;
}

// One line's document, or false for the Python path. text: where its 0xFF, " " and text go.
struct Line {
    uint8_t* text_end = nullptr;  // past the text written
    bool nonspace = false;
    bool has_text = false, has_id = false, has_source = false;
    bool default_id = true;  // no `id`, or null
    std::string id, source;  // source "" (absent, null or ""): the file's
};

bool parse_line(const uint8_t* p, const uint8_t* e, uint8_t* text, Line* out, std::string* key, PlainFn plain) {
    Parser in{p, e, plain};
    in.ws();
    if (in.p >= e || *in.p != '{') return false;
    ++in.p;
    in.ws();
    bool first = true;
    while (!(in.p < e && *in.p == '}' && first)) {
        if (in.p >= e || *in.p != '"') return false;
        key->clear();
        ToString k{key};
        if (!in.string(k)) return false;
        in.ws();
        if (in.p >= e || *in.p != ':') return false;
        ++in.p;
        in.ws();
        if (in.p >= e) return false;
        const uint8_t c = *in.p;
        if (*key == "text") {
            if (out->has_text || c != '"') return false;  // twice (json keeps the last), or not a string
            out->has_text = true;
            text[0] = 0xFF, text[1] = ' ';
            ToText sink{text + 2};
            if (!in.string(sink)) return false;
            out->text_end = sink.out, out->nonspace = sink.nonspace;
        } else if (*key == "id") {
            if (out->has_id) return false;
            out->has_id = true;
            if (c == '"') {
                ToString s{&out->id};
                if (!in.string(s)) return false;
                out->default_id = false;
            } else if (c == 'n') {
                if (!in.literal("null", 4)) return false;
            } else {
                const uint8_t* start;
                bool integer;
                if (!in.number(&start, &integer) || !integer) return false;  // a float: str() of it in Python
                const size_t digits = in.p - start - (*start == '-');
                if (digits > 18) return false;  // past 64 bits orjson reads a float: the Python path decides
                out->default_id = false;
                if (in.p - start == 2 && start[0] == '-' && start[1] == '0') out->id = "0";  // str(int("-0"))
                else out->id.assign(reinterpret_cast<const char*>(start), in.p - start);
            }
        } else if (*key == "source") {
            if (out->has_source) return false;
            out->has_source = true;
            if (c == '"') {
                ToString s{&out->source};
                if (!in.string(s)) return false;
            } else if (!in.literal("null", 4)) {
                return false;  // str() of another value, or a falsy one's default: the Python path
            }
        } else if (!in.value(1)) {
            return false;
        }
        in.ws();
        if (in.p >= e) return false;
        if (*in.p == '}') break;
        if (*in.p != ',') return false;
        ++in.p;
        in.ws();
        first = false;
    }
    ++in.p;  // the closing brace
    in.ws();
    return in.p == e && out->has_text;  // one object and nothing after it; without a text: Python's error
}

}  // namespace

extern "C" {

// The documents of data[0:n) (whole lines, the first numbered `lineno`) up to the first line the Python
// path must read: see the top of this file. Writes kept documents' buffer into text (room: n + 2 per
// line), their val flags (1: held out) and source numbers (0: the file's `name`; k: the k-th distinct
// record source, its bytes in source_bytes up to source_ends[k - 1]). result: [bytes consumed (at a
// stop: the stopping line's start), the line number there, kept documents, empty documents, text
// bytes, distinct record sources, the stopping line's length or -1]. `seed` holds "{seed}\0"; a
// document whose blake2b-64 of seed + id is below `threshold` is held out.
// Returns 1 when it stopped at a line for the Python path, 0 at the end of the data.
int64_t lw_jsonl_docs(const uint8_t* data, int64_t n, int64_t lineno, const uint8_t* name, int64_t name_len,
                      const uint8_t* seed, int64_t seed_len, uint64_t threshold, uint8_t* text, uint8_t* val,
                      int32_t* source, uint8_t* source_bytes, int64_t* source_ends, int64_t* result) {
    static const PlainFn plain = plain_fn(ISA_BEST);
    const uint8_t* p = data;
    const uint8_t* end = data + n;
    uint8_t* out = text;
    int64_t kept = 0, empty = 0, stop = -1;
    std::unordered_map<std::string, int32_t> sources;
    int64_t source_at = 0;
    std::string key, digest_input(reinterpret_cast<const char*>(seed), seed_len);
    Line line;
    while (p < end) {
        const uint8_t* nl = static_cast<const uint8_t*>(std::memchr(p, '\n', end - p));
        const uint8_t* e = nl ? nl : end;
        if (!blank(p, e)) {
            line.has_text = line.has_id = line.has_source = false;
            line.default_id = true;
            line.id.clear(), line.source.clear();
            if (!parse_line(p, e, out, &line, &key, plain)) {
                stop = e - p;
                break;
            }
            if (!line.nonspace) {
                ++empty;  // empty or whitespace only: counted, never encoded
            } else {
                digest_input.resize(seed_len);
                if (line.default_id) {
                    digest_input.append(reinterpret_cast<const char*>(name), name_len);
                    digest_input += ':';
                    digest_input += std::to_string(lineno);
                } else {
                    digest_input += line.id;
                }
                val[kept] = blake2b_64(reinterpret_cast<const uint8_t*>(digest_input.data()), digest_input.size()) <
                            threshold;
                int32_t which = 0;
                if (!line.source.empty()) {
                    auto found = sources.emplace(line.source, static_cast<int32_t>(sources.size()) + 1);
                    if (found.second) {
                        std::memcpy(source_bytes + source_at, line.source.data(), line.source.size());
                        source_at += line.source.size();
                        source_ends[sources.size() - 1] = source_at;
                    }
                    which = found.first->second;
                }
                source[kept++] = which;
                out = line.text_end;
            }
        }
        ++lineno;
        p = nl ? nl + 1 : end;
    }
    result[0] = p - data, result[1] = lineno, result[2] = kept, result[3] = empty;
    result[4] = out - text, result[5] = static_cast<int64_t>(sources.size()), result[6] = stop;
    return stop >= 0;
}

// The length of the run of plain string bytes at data[0:n) found with `isa`, or -1 when it does not run here.
int64_t lw_plain_run(const uint8_t* data, int64_t n, int64_t isa) {
    const PlainFn plain = plain_fn(isa);
    return plain ? static_cast<int64_t>(plain(data, static_cast<size_t>(n))) : -1;
}

// hashlib.blake2b(data, digest_size=8) as a little-endian uint64 (tests compare them).
uint64_t lw_blake2b_64(const uint8_t* data, int64_t n) { return blake2b_64(data, static_cast<size_t>(n)); }

}  // extern "C"
