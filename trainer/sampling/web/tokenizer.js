/*
 * The word and bpe tokenizers of the page `python -m trainer.export --format=web`
 * writes for a word or bpe model (a char model's page has no need of this file).
 * model.js sets window.CHAR_MODEL.tokenizer to one of:
 *
 *   {kind: "word", pieces: [...], oov_id: 0, unk_id: 1, first_char: 2, first_word: W,
 *    rule: the Python pattern}
 *   {kind: "bpe", pieces: [...], oov_id: 0, merges: [[left, right, merged], ...],
 *    utf8: {states: 8, table: base64 of states x size bytes}}
 *
 * pieces[id] is base64 of the UTF-8 bytes id decodes to; decoding joins them and
 * reads UTF-8 with a streaming TextDecoder, so a character whose bytes are split
 * across bpe ids comes out whole.
 *
 * word: the text is split as Python's re splits it by tokenization.WORD_RULE,
 *   r" ?\w+| ?[^\w\s]|\n+|\s", where Python's Unicode \w is exactly [\p{L}\p{N}_] and
 *   its \s is WORD_SPACE below (JavaScript's own \s differs in \x1c-\x1f, \x85 and
 *   \ufeff). A token among the words (ids first_word..) or chars (ids first_char..
 *   first_word - 1) takes its id; another single char takes oov_id; another longer
 *   token takes unk_id followed by each char's id (oov_id if unknown).
 * bpe: byte-level BPE as the `tokenizers` library's ByteLevel pre-tokenizer and BPE
 *   model do it: the text is split by the GPT-2 pattern (with \s as Unicode's
 *   White_Space, as the library's regex engine reads it), each part's UTF-8 bytes
 *   become the ids of the single-byte pieces, and the adjacent pair whose merge has the
 *   lowest rank (the leftmost of equals) is merged until no pair has a merge. Ids are
 *   the library's plus one. An id's bytes may begin or end inside a character, so the
 *   page draws only ids that continue the text as valid UTF-8 (trainer/sampling/utf8.py):
 *   utf8.table[state * size + id] has the high bit set when the id is allowed in that
 *   state of the row's UTF-8 automaton, and the state after the id in its low 7 bits.
 *
 * window.charTokenizer.create(spec) -> {kind, size, encode(text) -> ids, missing(text)
 * -> chars a word model cannot encode exactly, decoder() -> {feed(id) -> text,
 * flush() -> text}, silent: the ids with no text (a word model's <unk>), utf8: null for
 * word, for bpe {after(state, id) -> state, mask(logits, state) -> the logits with the ids
 * not allowed set to -Infinity}}.
 */
"use strict";

(function () {
  const WORD_CHAR = "\\p{L}\\p{N}_";
  const WORD_SPACE = "\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028" +
    "\\u2029\\u202f\\u205f\\u3000";
  const WORD_RULE = new RegExp(
    ` ?[${WORD_CHAR}]+| ?[^${WORD_CHAR}${WORD_SPACE}]|\\n+|[${WORD_SPACE}]`, "gu");
  const WHITE_SPACE = "\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029" +
    "\\u202f\\u205f\\u3000";
  const BYTE_LEVEL_RULE = new RegExp(
    `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${WHITE_SPACE}\\p{L}\\p{N}]+|` +
    `[${WHITE_SPACE}]+(?![^${WHITE_SPACE}])|[${WHITE_SPACE}]+`, "gu");

  function bytesOf(b64) {
    const raw = atob(b64), out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }

  function decoderOf(pieces) {
    const utf8 = new TextDecoder("utf-8");
    return {
      feed: (id) => utf8.decode(pieces[id] || pieces[0], { stream: true }),
      flush: () => utf8.decode(),
    };
  }

  function wordTokenizer(spec, pieces) {
    const text = new TextDecoder("utf-8");
    const ids = new Map(), chars = new Set();
    for (let id = spec.first_char; id < pieces.length; id++) {
      const token = text.decode(pieces[id]);
      ids.set(token, id);
      if (id < spec.first_word) chars.add(token);
    }
    return {
      encode(input) {
        const out = [];
        for (const [token] of input.matchAll(WORD_RULE)) {
          const found = ids.get(token);
          if (found !== undefined) {
            out.push(found);
          } else if ([...token].length === 1) {
            out.push(spec.oov_id);
          } else {
            out.push(spec.unk_id);
            for (const ch of token) out.push(chars.has(ch) ? ids.get(ch) : spec.oov_id);
          }
        }
        return out;
      },
      missing: (input) => [...new Set([...input].filter((ch) => !chars.has(ch)))]
        .sort((a, b) => a.codePointAt(0) - b.codePointAt(0)),
    };
  }

  function bpeTokenizer(spec, pieces) {
    const byteIds = new Array(256);
    pieces.forEach((p, id) => {
      if (id !== spec.oov_id && p.length === 1) byteIds[p[0]] = id;
    });
    const size = pieces.length, ranks = new Map();
    spec.merges.forEach(([left, right, merged], rank) => {
      ranks.set(left * size + right, [rank, merged]);
    });
    const utf8 = new TextEncoder();

    function merge(ids) {
      for (;;) {
        let best = -1, bestRank = Infinity, merged = 0;
        for (let i = 0; i + 1 < ids.length; i++) {
          const found = ranks.get(ids[i] * size + ids[i + 1]);
          if (found && found[0] < bestRank) [bestRank, merged, best] = [found[0], found[1], i];
        }
        if (best < 0) return ids;
        ids.splice(best, 2, merged);
      }
    }

    const table = bytesOf(spec.utf8.table);
    const utf8Rule = {
      after: (state, id) => table[state * size + id] & 0x7f,
      mask(logits, state) {
        const row = table.subarray(state * size, (state + 1) * size);
        return logits.map((l, id) => (row[id] & 0x80 ? l : -Infinity));
      },
    };

    return {
      utf8: utf8Rule,
      encode(input) {
        const out = [];
        for (const [part] of input.matchAll(BYTE_LEVEL_RULE)) {
          out.push(...merge(Array.from(utf8.encode(part), (b) => byteIds[b])));
        }
        return out;
      },
      missing: () => [],
    };
  }

  function create(spec) {
    const pieces = spec.pieces.map(bytesOf);
    const made = spec.kind === "word" ? wordTokenizer(spec, pieces) :
      spec.kind === "bpe" ? bpeTokenizer(spec, pieces) : null;
    if (!made) throw new Error(`model.js has an unknown tokenizer kind ${spec.kind}`);
    // Ids with no text of their own (a word model's <unk>): the page never draws them.
    const silent = pieces.flatMap((p, id) => (id !== spec.oov_id && !p.length ? [id] : []));
    return { kind: spec.kind, size: pieces.length, decoder: () => decoderOf(pieces), utf8: null,
             silent, ...made };
  }

  window.charTokenizer = { create };
})();
