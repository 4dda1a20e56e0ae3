// SentencePiece's BPE encoding of the word cache's new chunks (tokenizer/word_cache.py, FlatEncoder._add),
// for the models the word cache serves: a BPE model with byte fallback whose pieces are all normal, control,
// unknown or byte pieces (no user-defined or unused ones), identity normalisation. SentencePiece itself
// costs ~3 us per chunk in a batch call (its normaliser, its result protos, Python lists); a 1 GiB
// `data mix` sends it ~400k chunks.
//
// The algorithm is SentencePiece's (bpe_model.cc, Apache-2.0; this is a separate implementation of it):
// the text "▁" + key, every " " as "▁", is cut into characters; the adjacent pair whose concatenation is
// a normal piece of the highest score is merged, the leftmost on a tie, until no pair is a piece; each
// symbol left is its piece's id, or (a character outside the vocabulary) the ids of its UTF-8 bytes'
// <0xXX> pieces. word_cache checks the model's conditions, compares a sample of every call's keys with
// SentencePiece, and the tests compare random and hostile keys with it on several models.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <queue>
#include <string>
#include <vector>

namespace {

// The normal pieces: an open-addressing table over their bytes, looked up without building a string.
class Pieces {
public:
    struct Entry {
        uint32_t at, size;  // the piece's bytes in pool_
        int32_t id;
        float score;
    };

    void build(const uint8_t* bytes, const int64_t* ends, const int32_t* ids, const float* scores, int64_t n) {
        pool_.assign(reinterpret_cast<const char*>(bytes), n ? ends[n - 1] : 0);
        size_t size = 16;
        while (size < 2 * static_cast<size_t>(n)) size *= 2;  // load <= 1/2
        slots_.assign(size, -1);
        entries_.clear();
        for (int64_t k = 0, at = 0; k < n; at = ends[k++]) {
            const Entry e{static_cast<uint32_t>(at), static_cast<uint32_t>(ends[k] - at), ids[k], scores[k]};
            if (find(pool_.data() + e.at, e.size)) continue;  // listed twice: never in a model SentencePiece loads
            size_t slot = hash(pool_.data() + e.at, e.size) & (slots_.size() - 1);
            while (slots_[slot] >= 0) slot = (slot + 1) & (slots_.size() - 1);
            slots_[slot] = static_cast<int32_t>(entries_.size());
            entries_.push_back(e);
        }
    }

    const Entry* find(const char* p, size_t n) const {
        for (size_t slot = hash(p, n) & (slots_.size() - 1);; slot = (slot + 1) & (slots_.size() - 1)) {
            const int32_t k = slots_[slot];
            if (k < 0) return nullptr;
            const Entry& e = entries_[k];
            if (e.size == n && std::memcmp(pool_.data() + e.at, p, n) == 0) return &e;
        }
    }

private:
    static uint64_t hash(const char* p, size_t n) {
        uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
        for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 0x100000001B3ull;
        h ^= h >> 29;
        h *= 0xBF58476D1CE4E5B9ull;
        return h ^ (h >> 32);
    }
    std::string pool_;
    std::vector<int32_t> slots_;  // -1: empty
    std::vector<Entry> entries_;
};

struct Model {
    Pieces pieces;
    int32_t byte_id[256];
    std::vector<int32_t> lone;  // the ids of a lone "▁" (a chunk cut before an isolated byte drops them)
    uint8_t isolated[256];      // word_cache.isolated_bytes
};

struct Symbol {
    int32_t prev, next;
    uint32_t begin, size;  // the bytes of the text it covers; size 0 once merged into its left neighbour
    float score;           // the score of the piece this symbol and the next one make; NO_PAIR when none
};

constexpr float NO_PAIR = -3.4e38f;  // below every piece's score (SentencePiece's scores are finite floats)

struct Pair {
    float score;
    int32_t left, right;
    uint32_t size;  // both symbols' sizes when queued: a pair whose symbols changed since is stale
    bool operator<(const Pair& o) const {  // priority_queue's top: the highest score, then the leftmost
        return score < o.score || (score == o.score && left > o.left);
    }
};

constexpr size_t SCAN_SYMBOLS = 64;  // up to this many characters the best pair is found by a scan, past it by a heap

inline int char_len(uint8_t b) {  // a UTF-8 lead byte's sequence length (the keys are valid UTF-8)
    return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

class Encoder {
public:
    explicit Encoder(const Model& m) : m_(m) {}

    // The ids of `text` (already "▁"-prefixed, spaces as "▁") appended to out; false when a character is
    // outside the vocabulary and has no byte piece.
    bool encode(const std::string& text, std::vector<int32_t>& out) {
        text_ = text.data();
        symbols_.clear();
        for (uint32_t i = 0; i < text.size();) {
            uint32_t n = static_cast<uint32_t>(char_len(static_cast<uint8_t>(text[i])));
            if (i + n > text.size()) n = static_cast<uint32_t>(text.size()) - i;
            const int32_t k = static_cast<int32_t>(symbols_.size());
            symbols_.push_back({k - 1, k + 1, i, n, NO_PAIR});
            i += n;
        }
        if (symbols_.empty()) return true;
        symbols_.back().next = -1;
        if (symbols_.size() <= SCAN_SYMBOLS) scan_merges();
        else heap_merges();
        for (int32_t k = 0; k >= 0; k = symbols_[k].next) {
            const Symbol& s = symbols_[k];
            if (const Pieces::Entry* e = m_.pieces.find(text_ + s.begin, s.size)) {
                out.push_back(e->id);
                continue;
            }
            for (uint32_t i = 0; i < s.size; ++i) {  // byte fallback
                const int32_t id = m_.byte_id[static_cast<uint8_t>(text_[s.begin + i])];
                if (id < 0) return false;
                out.push_back(id);
            }
        }
        return true;
    }

private:
    const Pieces::Entry* joined(int32_t left) const {  // the piece symbol `left` and its next make, if any
        const Symbol& a = symbols_[left];
        return a.next < 0 ? nullptr : m_.pieces.find(text_ + a.begin, a.size + symbols_[a.next].size);
    }

    void merge(int32_t left) {  // symbol `left` takes in its next one
        Symbol& a = symbols_[left];
        Symbol& b = symbols_[a.next];
        a.size += b.size;
        b.size = 0;
        a.next = b.next;
        if (b.next >= 0) symbols_[b.next].prev = left;
    }

    // Few symbols: each one's pair score kept, the best found by a scan (strictly greater: the leftmost
    // of equal scores), two scores updated per merge.
    void scan_merges() {
        for (int32_t k = 0; k >= 0; k = symbols_[k].next) {
            const Pieces::Entry* e = joined(k);
            symbols_[k].score = e ? e->score : NO_PAIR;
        }
        for (;;) {
            int32_t best = -1;
            float top = NO_PAIR;
            for (int32_t k = 0; k >= 0; k = symbols_[k].next) {
                if (symbols_[k].score > top) top = symbols_[k].score, best = k;
            }
            if (best < 0) return;
            merge(best);
            for (int32_t k : {symbols_[best].prev, best}) {
                if (k < 0) continue;
                const Pieces::Entry* e = joined(k);
                symbols_[k].score = e ? e->score : NO_PAIR;
            }
        }
    }

    // Many symbols: SentencePiece's agenda, a heap of pairs by (score, leftmost), stale ones skipped.
    void heap_merges() {
        auto push = [&](int32_t left) {
            if (left < 0) return;
            if (const Pieces::Entry* e = joined(left)) agenda_.push({e->score, left, symbols_[left].next, e->size});
        };
        for (int32_t k = 0; k >= 0; k = symbols_[k].next) push(k);
        while (!agenda_.empty()) {
            const Pair top = agenda_.top();
            agenda_.pop();
            const Symbol &a = symbols_[top.left], &b = symbols_[top.right];
            if (!a.size || !b.size || a.next != top.right || a.size + b.size != top.size) continue;  // stale
            merge(top.left);
            push(symbols_[top.left].prev);
            push(top.left);
        }
    }

    const Model& m_;
    const char* text_ = nullptr;
    std::vector<Symbol> symbols_;
    std::priority_queue<Pair> agenda_;
};

}  // namespace

extern "C" {

// A model from its normal pieces (UTF-8, back to back, piece k ending at ends[k]), their ids and scores,
// the id of each byte's <0xXX> piece (-1: none), the lone "▁"'s ids and the isolated bytes (256 flags).
void* lw_bpe_new(const uint8_t* pieces, const int64_t* ends, const int32_t* ids, const float* scores, int64_t n,
                 const int32_t* byte_ids, const int32_t* lone, int64_t lone_n, const uint8_t* isolated) {
    Model* m = new Model;
    m->pieces.build(pieces, ends, ids, scores, n);
    std::memcpy(m->byte_id, byte_ids, sizeof m->byte_id);
    m->lone.assign(lone, lone + lone_n);
    std::memcpy(m->isolated, isolated, sizeof m->isolated);
    return m;
}

void lw_bpe_free(void* model) { delete static_cast<Model*>(model); }

// The ids of `keys` keys (key k: buf[start[k]:start[k] + length[k]]) as word_cache._add gives them: the
// text "▁" + key encoded; the empty key is the lone "▁"; a key starting with an isolated byte has the
// lone "▁"'s ids dropped. Writes them back to back into ids (room for cap) and each key's count.
// Returns the ids written, -1 when cap is short, -2 for a key SentencePiece must encode (no byte piece
// for a character, or a dropped "▁" whose ids are not the lone ones).
int64_t lw_bpe_encode(void* model, const uint8_t* buf, const int64_t* start, const int64_t* length, int64_t keys,
                      int32_t* ids, int64_t cap, int64_t* counts) {
    const Model& m = *static_cast<Model*>(model);
    Encoder encoder(m);
    std::string text;
    std::vector<int32_t> out;
    int64_t written = 0;
    for (int64_t k = 0; k < keys; ++k) {
        const uint8_t* key = buf + start[k];
        out.clear();
        if (length[k] == 0) {
            out = m.lone;
        } else {
            text.assign("\xe2\x96\x81");  // the dummy prefix
            for (int64_t i = 0; i < length[k]; ++i) {
                if (key[i] == ' ') text.append("\xe2\x96\x81");
                else text.push_back(static_cast<char>(key[i]));
            }
            if (!encoder.encode(text, out)) return -2;
            if (m.isolated[key[0]]) {
                if (out.size() < m.lone.size() || !std::equal(m.lone.begin(), m.lone.end(), out.begin())) return -2;
                out.erase(out.begin(), out.begin() + static_cast<int64_t>(m.lone.size()));
            }
        }
        if (written + static_cast<int64_t>(out.size()) > cap) return -1;
        std::memcpy(ids + written, out.data(), out.size() * sizeof(int32_t));
        written += static_cast<int64_t>(out.size());
        counts[k] = static_cast<int64_t>(out.size());
    }
    return written;
}

}  // extern "C"
