#include "tokenizer.h"

#include <algorithm>
#include <queue>

#include "error.h"
#include "unicode_table.h"

namespace gptbc {

namespace {

// ---- Unicode ----

bool in_table(const CodeRange* begin, const CodeRange* end, char32_t c) {
  auto it = std::upper_bound(begin, end, c, [](char32_t v, const CodeRange& r) { return v < r.lo; });
  return it != begin && c <= (it - 1)->hi;
}

bool is_letter(char32_t c) { return in_table(std::begin(kLetterRanges), std::end(kLetterRanges), c); }
bool is_number(char32_t c) { return in_table(std::begin(kNumberRanges), std::end(kNumberRanges), c); }

// \s of the Oniguruma regex engine that `tokenizers` uses: the Unicode White_Space property. (Not
// C's isspace, nor Python's str.isspace, which also counts U+001C..U+001F.)
bool is_space(char32_t c) {
  return (c >= 0x9 && c <= 0xD) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// One step of UTF-8 decoding at s[i]: how many bytes it takes and what they are.
enum class Utf8 { kValid, kInvalid, kIncomplete };

Utf8 utf8_step(const std::string& s, size_t i, size_t* len, char32_t* cp) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  unsigned char b0 = b(0);
  if (b0 < 0x80) {
    *len = 1;
    *cp = b0;
    return Utf8::kValid;
  }
  // Expected length and the allowed range of the second byte (Unicode Table 3-7, well-formed sequences).
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;  // no overlong forms
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;  // no overlong forms
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    *len = 1;
    return Utf8::kInvalid;
  }
  char32_t c = b0 & (0xFF >> (need + 1));
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) {
      *len = k;
      return Utf8::kIncomplete;
    }
    unsigned char bk = b(k);
    if (bk < (k == 1 ? lo : 0x80) || bk > (k == 1 ? hi : 0xBF)) {
      *len = k;  // the maximal subpart so far is one invalid unit
      return Utf8::kInvalid;
    }
    c = (c << 6) | (bk & 0x3F);
  }
  *len = need;
  *cp = c;
  return Utf8::kValid;
}

void append_utf8(std::string* out, char32_t c) {
  if (c < 0x80) {
    *out += static_cast<char>(c);
  } else if (c < 0x800) {
    *out += static_cast<char>(0xC0 | (c >> 6));
    *out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    *out += static_cast<char>(0xE0 | (c >> 12));
    *out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    *out += static_cast<char>(0xF0 | (c >> 18));
    *out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    *out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

std::u32string to_code_points(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    size_t len;
    char32_t c;
    if (utf8_step(s, i, &len, &c) != Utf8::kValid) throw Error("not valid UTF-8");
    out += c;
    i += len;
  }
  return out;
}

std::string to_utf8(const std::u32string& s, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) append_utf8(&out, s[i]);
  return out;
}

// ---- byte-level alphabet ----

// GPT-2's byte ↔ character table: printable Latin-1 bytes stand for themselves, the other 68 bytes for
// U+0100 onwards, in byte order, so every token is printable text.
std::vector<char32_t> byte_chars() {
  std::vector<char32_t> table(256);
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    table[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

// What the ByteLevel decoder makes of one token: each character back to its byte; a token with a
// character outside the alphabet is taken as written.
std::string byte_level_decode(const std::string& token, const std::string& where) {
  static const std::unordered_map<char32_t, int> byte_of = [] {
    std::unordered_map<char32_t, int> m;
    std::vector<char32_t> chars = byte_chars();
    for (int b = 0; b < 256; ++b) m[chars[b]] = b;
    return m;
  }();
  std::u32string cps;
  try {
    cps = to_code_points(token);
  } catch (const Error&) {
    throw Error(where + ": a token is not valid UTF-8");
  }
  std::string bytes;
  for (char32_t c : cps) {
    auto it = byte_of.find(c);
    if (it == byte_of.end()) return token;
    bytes += static_cast<char>(it->second);
  }
  return bytes;
}

// ---- pre-tokenizers ----

// The GPT-2 pattern, 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ , matched
// by hand: the alternatives in order, each greedy, as the regex engine tries them at every position.
size_t gpt2_match(const std::u32string& s, size_t i) {
  const size_t n = s.size();
  static const char* const kContractions[] = {"s", "t", "re", "ve", "m", "ll", "d"};
  if (s[i] == '\'') {
    for (const char* c : kContractions) {
      size_t k = 0;
      while (c[k] && i + 1 + k < n && s[i + 1 + k] == static_cast<char32_t>(c[k])) ++k;
      if (!c[k]) return 1 + k;
    }
  }
  auto is_other = [](char32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
  for (auto cls : {is_letter, is_number, +is_other}) {
    size_t j = i + (s[i] == ' ' && i + 1 < n && cls(s[i + 1]) ? 1 : 0);
    if (!cls(s[j])) continue;
    while (j < n && cls(s[j])) ++j;
    return j - i;
  }
  // Whitespace: the whole run, except that a run followed by a non-space leaves its last character to
  // the next match (a ' ' there starts " word") — unless that would leave the run empty.
  size_t j = i;
  while (j < n && is_space(s[j])) ++j;
  if (j < n && j - i > 1) return j - i - 1;
  return j - i;
}

void split_gpt2(const std::string& text, std::vector<std::string>* out) {
  std::u32string s = to_code_points(text);
  for (size_t i = 0; i < s.size();) {
    size_t len = gpt2_match(s, i);
    out->push_back(to_utf8(s, i, i + len));
    i += len;
  }
}

// Digits: every numeric character alone (individual) or each run of them as one piece.
void split_digits(const std::string& text, bool individual, std::vector<std::string>* out) {
  std::u32string s = to_code_points(text);
  for (size_t i = 0; i < s.size();) {
    size_t j = i + 1;
    if (is_number(s[i])) {
      while (!individual && j < s.size() && is_number(s[j])) ++j;
    } else {
      while (j < s.size() && !is_number(s[j])) ++j;
    }
    out->push_back(to_utf8(s, i, j));
    i = j;
  }
}

bool get_bool(const json::Object& o, const char* key, bool fallback, const std::string& where) {
  auto v = json::find(o, key);
  if (!v) return fallback;
  if (auto b = v->as<bool>()) return *b;
  throw Error(where + ": " + key + " must be true or false");
}

std::string kind_of(const json::Object& o, const std::string& where) {
  return json::as_string(json::need(o, "type", where), where + " type");
}

}  // namespace

// ---- loading ----

Tokenizer::Tokenizer(const std::string& path) {
  json::Object root = json::as_object(json::parse_file(path), path);
  auto unsupported = [&](const std::string& what) {
    return Error(path + ": " + what + " is not supported by gptbc-run (byte-level BPE tokenizers only)");
  };
  if (json::find(root, "normalizer")) throw unsupported("a normalizer");
  auto model = json::find(root, "model");
  if (!model) throw Error(path + ": no model");
  load_model(path, json::as_object(*model, path + ": model"));
  load_added_tokens(path, root);
  auto pre = json::find(root, "pre_tokenizer");
  if (!pre) throw unsupported("a missing pre_tokenizer");
  load_pre_tokenizer(path, *pre);
  if (std::none_of(pre_.begin(), pre_.end(), [](const PreTokenizer& p) { return p.kind == PreTokenizer::kByteLevel; }))
    throw unsupported("a pre_tokenizer without ByteLevel");
  auto decoder = json::find(root, "decoder");
  if (!decoder || kind_of(json::as_object(*decoder, path + ": decoder"), path + ": decoder") != "ByteLevel")
    throw unsupported("a decoder other than ByteLevel");
  // post_processor only adds tokens when asked to (add_special_tokens), which we never do.
}

void Tokenizer::load_model(const std::string& path, const json::Object& model) {
  std::string where = path + ": model";
  std::string type = kind_of(model, where);
  if (type != "BPE") throw Error(where + " type " + type + " is not supported by gptbc-run (BPE only)");
  if (auto d = json::find(model, "dropout"); d && json::as_number(*d, where + ".dropout") != 0.0)
    throw Error(where + ": BPE dropout is not supported (it makes tokenization random)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (auto v = json::find(model, key); v && !json::as_string(*v, where).empty())
      throw Error(where + ": " + key + " is not supported by gptbc-run");
  }
  if (get_bool(model, "byte_fallback", false, where)) throw Error(where + ": byte_fallback is not supported");
  fuse_unk_ = get_bool(model, "fuse_unk", false, where);
  ignore_merges_ = get_bool(model, "ignore_merges", false, where);

  for (const auto& kv : json::as_object(json::need(model, "vocab", where), where + ".vocab")) {
    std::string token = json::as_string(kv.first, where + ".vocab");
    int64_t id = json::as_int(kv.second, where + ".vocab[" + token + "]");
    if (id < 0 || id >= (1 << 30)) throw Error(where + ".vocab[" + token + "]: id out of range");
    vocab_[token] = static_cast<int32_t>(id);
    if (static_cast<size_t>(id) >= bytes_of_.size()) bytes_of_.resize(id + 1);
    bytes_of_[id] = byte_level_decode(token, where + ".vocab");
  }
  const std::vector<char32_t> chars = byte_chars();
  for (int b = 0; b < 256; ++b) {
    std::string c;
    append_utf8(&c, chars[b]);
    auto it = vocab_.find(c);
    byte_id_[b] = it == vocab_.end() ? -1 : it->second;
  }
  if (auto unk = json::find(model, "unk_token")) {
    std::string u = json::as_string(*unk, where + ".unk_token");
    auto it = vocab_.find(u);
    if (it == vocab_.end()) throw Error(where + ": unk_token " + u + " is not in the vocabulary");
    unk_ = it->second;
  }

  auto merges = json::as_array(json::need(model, "merges", where), where + ".merges");
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    std::string at = where + ".merges[" + std::to_string(rank) + "]";
    std::string left, right;
    if (auto pair = merges[rank].as<json::Array>()) {  // ["a", "b"] (tokenizers >= 0.20)
      if (pair->size() != 2) throw Error(at + ": expected two tokens");
      left = json::as_string((*pair)[0], at);
      right = json::as_string((*pair)[1], at);
    } else {  // "a b"
      std::string s = json::as_string(merges[rank], at);
      size_t space = s.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 == s.size()) throw Error(at + ": expected 'a b'");
      left = s.substr(0, space);
      right = s.substr(space + 1);
    }
    auto a = vocab_.find(left), b = vocab_.find(right), m = vocab_.find(left + right);
    if (a == vocab_.end() || b == vocab_.end() || m == vocab_.end())
      throw Error(at + ": a token of this merge is not in the vocabulary");
    uint64_t key = (static_cast<uint64_t>(a->second) << 32) | static_cast<uint32_t>(b->second);
    merges_[key] = {static_cast<uint32_t>(rank), m->second};  // a repeated pair keeps its last rank, as tokenizers
  }
  special_.assign(bytes_of_.size(), false);
}

void Tokenizer::load_added_tokens(const std::string& path, const json::Object& root) {
  auto list = json::find(root, "added_tokens");
  if (!list) return;
  auto tokens = json::as_array(*list, path + ": added_tokens");
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::string at = path + ": added_tokens[" + std::to_string(i) + "]";
    json::Object t = json::as_object(tokens[i], at);
    std::string content = json::as_string(json::need(t, "content", at), at + ".content");
    int64_t id = json::as_int(json::need(t, "id", at), at + ".id");
    if (id < 0 || id >= (1 << 30)) throw Error(at + ": id out of range");
    for (const char* key : {"single_word", "lstrip", "rstrip"}) {
      if (get_bool(t, key, false, at)) throw Error(at + ": " + key + "=true is not supported by gptbc-run");
    }
    if (content.empty()) continue;
    if (static_cast<size_t>(id) >= bytes_of_.size()) bytes_of_.resize(id + 1);
    special_.resize(bytes_of_.size(), false);
    bytes_of_[id] = byte_level_decode(content, at);  // added tokens go through the decoder too
    special_[id] = get_bool(t, "special", false, at);
    (get_bool(t, "normalized", !special_[id], at) ? added_normalized_ : added_raw_).push_back({content, int32_t(id)});
  }
}

void Tokenizer::load_pre_tokenizer(const std::string& path, const json::Value& spec) {
  std::string where = path + ": pre_tokenizer";
  json::Object o = json::as_object(spec, where);
  std::string type = kind_of(o, where);
  if (type == "Sequence") {
    for (const auto& step : json::as_array(json::need(o, "pretokenizers", where), where))
      load_pre_tokenizer(path, step);
  } else if (type == "Digits") {
    pre_.push_back({PreTokenizer::kDigits, get_bool(o, "individual_digits", false, where)});
  } else if (type == "ByteLevel") {
    PreTokenizer p{PreTokenizer::kByteLevel};
    p.add_prefix_space = get_bool(o, "add_prefix_space", true, where);
    p.use_regex = get_bool(o, "use_regex", true, where);
    pre_.push_back(p);
  } else {
    throw Error(where + " type " + type + " is not supported by gptbc-run (Digits, ByteLevel and Sequence are)");
  }
}

// ---- encoding ----

// Cut the ordinary pieces at every occurrence of an added token: at each position the leftmost match,
// the longest one there (Aho-Corasick's leftmost-longest, which tokenizers uses).
void Tokenizer::split_added(std::vector<Piece>* pieces, const std::vector<AddedToken>& tokens) const {
  if (tokens.empty()) return;
  std::vector<Piece> out;
  for (Piece& p : *pieces) {
    if (p.added_id >= 0) {
      out.push_back(std::move(p));
      continue;
    }
    const std::string& s = p.text;
    size_t start = 0;
    for (size_t i = 0; i < s.size();) {
      const AddedToken* best = nullptr;
      for (const AddedToken& t : tokens) {
        if (s.compare(i, t.content.size(), t.content) == 0 && (!best || t.content.size() > best->content.size()))
          best = &t;
      }
      if (!best) {
        ++i;
        continue;
      }
      if (i > start) out.push_back({s.substr(start, i - start), -1});
      out.push_back({best->content, best->id});
      i += best->content.size();
      start = i;
    }
    if (start < s.size()) out.push_back({s.substr(start), -1});
  }
  *pieces = std::move(out);
}

std::vector<std::string> Tokenizer::pre_tokenize(const std::string& text) const {
  std::vector<std::string> pieces{text};
  for (const PreTokenizer& p : pre_) {
    std::vector<std::string> next;
    for (std::string& piece : pieces) {
      if (p.kind == PreTokenizer::kDigits) {
        split_digits(piece, p.individual_digits, &next);
        continue;
      }
      if (p.add_prefix_space && piece[0] != ' ') piece.insert(0, " ");
      if (p.use_regex) split_gpt2(piece, &next);
      else next.push_back(std::move(piece));
    }
    pieces = std::move(next);
  }
  return pieces;
}

// BPE over the bytes of one piece: start from one symbol per byte and apply the lowest-ranked merge
// among adjacent pairs (leftmost on ties) until none applies — the order `tokenizers` merges in.
void Tokenizer::bpe(const std::string& piece, std::vector<int32_t>* out) const {
  if (ignore_merges_) {
    static const std::vector<char32_t> chars = byte_chars();
    std::string mapped;
    for (unsigned char b : piece) append_utf8(&mapped, chars[b]);
    if (auto it = vocab_.find(mapped); it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Symbol> sym;
  bool last_unk = false;
  for (unsigned char b : piece) {
    int32_t id = byte_id_[b];
    if (id < 0) {
      if (!unk_) continue;  // no unk token: the byte is dropped, as tokenizers does
      if (fuse_unk_ && last_unk) continue;
      id = *unk_;
    }
    last_unk = id == unk_;
    int n = static_cast<int>(sym.size());
    sym.push_back({id, n - 1, -1, true});
    if (n > 0) sym[n - 1].next = n;
  }
  struct Merge {
    uint32_t rank;
    int pos;
    int32_t new_id;
    bool operator>(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Merge, std::vector<Merge>, std::greater<Merge>> queue;
  auto lookup = [&](int left) -> const std::pair<uint32_t, int32_t>* {
    int right = sym[left].next;
    if (right < 0) return nullptr;
    uint64_t key = (static_cast<uint64_t>(sym[left].id) << 32) | static_cast<uint32_t>(sym[right].id);
    auto it = merges_.find(key);
    return it == merges_.end() ? nullptr : &it->second;
  };
  auto push = [&](int left) {
    if (left < 0) return;
    if (auto m = lookup(left)) queue.push({m->first, left, m->second});
  };
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) push(i);
  while (!queue.empty()) {
    Merge top = queue.top();
    queue.pop();
    if (!sym[top.pos].alive) continue;
    auto m = lookup(top.pos);
    if (!m || m->second != top.new_id) continue;  // a stale entry: its pair changed since
    int right = sym[top.pos].next;
    sym[top.pos].id = top.new_id;
    sym[top.pos].next = sym[right].next;
    sym[right].alive = false;
    if (sym[right].next >= 0) sym[sym[right].next].prev = top.pos;
    push(sym[top.pos].prev);
    push(top.pos);
  }
  for (const Symbol& s : sym)
    if (s.alive) out->push_back(s.id);
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  try {
    to_code_points(text);
  } catch (const Error&) {
    throw Error("the prompt is not valid UTF-8");
  }
  std::vector<Piece> pieces{{text, -1}};
  split_added(&pieces, added_raw_);
  split_added(&pieces, added_normalized_);
  std::vector<int32_t> ids;
  for (const Piece& p : pieces) {
    if (p.added_id >= 0) {
      ids.push_back(p.added_id);
      continue;
    }
    if (p.text.empty()) continue;
    for (const std::string& word : pre_tokenize(p.text)) bpe(word, &ids);
  }
  return ids;
}

// ---- decoding ----

const std::string& Tokenizer::token_bytes(int32_t id) const {
  static const std::string kNone;
  return id >= 0 && static_cast<size_t>(id) < bytes_of_.size() ? bytes_of_[id] : kNone;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < special_.size() && special_[id];
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string bytes;
  for (int32_t id : ids) bytes += token_bytes(id);
  return utf8_lossy(bytes);
}

std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  for (size_t i = 0; i < bytes.size();) {
    size_t len;
    char32_t c;
    if (utf8_step(bytes, i, &len, &c) == Utf8::kValid) out.append(bytes, i, len);
    else out += "\xEF\xBF\xBD";  // U+FFFD
    i += len;
  }
  return out;
}

size_t utf8_complete_prefix(const std::string& bytes) {
  for (size_t i = 0; i < bytes.size();) {
    size_t len;
    char32_t c;
    if (utf8_step(bytes, i, &len, &c) == Utf8::kIncomplete) return i;
    i += len;
  }
  return bytes.size();
}

}  // namespace gptbc
