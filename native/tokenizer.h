// Byte-level BPE tokenization from a Hugging Face tokenizer.json, giving the ids the `tokenizers` library
// gives (GPT-2 / SantaCoder / StarCoder style). Anything in the file this does not implement is refused
// when loading, with one line naming the feature, rather than tokenized differently.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "json.h"

namespace gptbc {

class Tokenizer {
 public:
  // Throws Error ("PATH: ...") for a missing, malformed or unsupported file.
  explicit Tokenizer(const std::string& path);

  // Token ids of `text` (no special tokens added); Error if it is not valid UTF-8.
  std::vector<int32_t> encode(const std::string& text) const;
  // Text of `ids`: the tokens' bytes joined and read as UTF-8, invalid sequences becoming U+FFFD.
  std::string decode(const std::vector<int32_t>& ids) const;
  // The bytes one token stands for ("" for an unknown id). Streaming output joins these.
  const std::string& token_bytes(int32_t id) const;
  bool is_special(int32_t id) const;
  int32_t size() const { return static_cast<int32_t>(bytes_of_.size()); }

 private:
  struct AddedToken {
    std::string content;
    int32_t id;
  };
  struct PreTokenizer {
    enum Kind { kDigits, kByteLevel } kind;
    bool individual_digits = false;
    bool add_prefix_space = false;
    bool use_regex = true;
  };
  struct Piece {
    std::string text;
    int32_t added_id;  // -1: ordinary text, still to be pre-tokenized and run through BPE
  };

  void load_added_tokens(const std::string& path, const json::Object& root);
  void load_pre_tokenizer(const std::string& path, const json::Value& spec);
  void load_model(const std::string& path, const json::Object& model);
  void split_added(std::vector<Piece>* pieces, const std::vector<AddedToken>& tokens) const;
  std::vector<std::string> pre_tokenize(const std::string& text) const;
  void bpe(const std::string& piece, std::vector<int32_t>* out) const;

  std::vector<AddedToken> added_raw_;         // matched in the text as written
  std::vector<AddedToken> added_normalized_;  // matched after the (absent) normalizer: in what remains
  std::vector<PreTokenizer> pre_;
  std::unordered_map<std::string, int32_t> vocab_;  // byte-level token string → id
  std::unordered_map<uint64_t, std::pair<uint32_t, int32_t>> merges_;  // (left, right) → (rank, merged id)
  int32_t byte_id_[256];  // id of the one-character token for each byte; -1 if the vocab lacks it
  std::optional<int32_t> unk_;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  std::vector<std::string> bytes_of_;  // id → bytes
  std::vector<bool> special_;
};

// Valid UTF-8 of `bytes`, each maximal invalid subsequence replaced by U+FFFD (as Rust's
// String::from_utf8_lossy and Python's errors="replace" do).
std::string utf8_lossy(const std::string& bytes);
// Length of the longest prefix of `bytes` that ends on a character boundary, holding back a tail that is
// an incomplete but so far valid UTF-8 sequence (it may be completed by the next token's bytes).
size_t utf8_complete_prefix(const std::string& bytes);

}  // namespace gptbc
