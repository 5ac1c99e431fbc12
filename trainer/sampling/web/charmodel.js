/*
 * The runtime of the page `python -m trainer.export --format=web` writes: the LSTM,
 * the choice of each next character and the prompt box, in plain JavaScript with no
 * downloads, so the folder works from disk (file://) or any static host.
 *
 * model.js, loaded before this file, sets window.CHAR_MODEL:
 *
 *   {format: "char-lstm-web", version: 1 (a char model) or 2 (word or bpe),
 *    vocab: {chars: [...], lowercase: bool, oov_id: 0},  a char model's ids 1..N are
 *                                                         its chars in order
 *    tokenizer: {kind: "word" | "bpe", ...},              version 2 only: the model's
 *                                                         ids (format in tokenizer.js)
 *    info: {name, config, best},                          what the page shows
 *    embedding: T (vocab, embedding_dim),
 *    lstms: [{kernel: T (inputs, 4 units), recurrent_kernel: T (units, 4 units),
 *             bias: T (4 units)}, ...],                   bottom layer first
 *    logits: {kernel: T (units, vocab), bias: T (vocab)}}
 *
 * where T is {shape: [...], data: base64 of the float32 values, little-endian,
 * row-major}: Keras's own layout, gates in the order i, f, c, o. One step is
 *   z = x kernel + h recurrent_kernel + bias;  c' = s(f) c + s(i) tanh(c_gate);
 *   h' = s(o) tanh(c'),  with s the logistic sigmoid,
 * each layer's h' feeding the next, and h' logits.kernel + logits.bias the logits.
 * The out-of-vocabulary id 0 is never drawn, nor a word model's <unk> (it writes no
 * text; an unknown word's letters are drawn one by one). A word or bpe model's page loads
 * tokenizer.js before this file; the length asked for counts characters of output, and
 * generation stops at the first token that reaches it. A bpe page draws only ids whose
 * bytes continue the text as valid UTF-8 (the tokenizer's utf8 rule, as in Python).
 *
 * The choice repeats trainer/sampling/next_char.py: temperature, then top-k, then
 * top-p, then the Gumbel-max draw with the counter-based hash `uniform` of (seed,
 * step, char). The same seed therefore draws from the same numbers as
 * `trainer.generate --seed`; the texts agree unless two candidates are within the
 * rounding that separates this float64 arithmetic from TensorFlow's float32.
 * Seeds are integers from 0 to 2^53 - 1, the integers a JavaScript number holds.
 *
 * window.charModel is the API (and what the tests drive): newState(), step(id,
 * state) -> logits (the ids never drawn set to -Infinity), encode(text, skip) -> {ids, missing},
 * probabilities(ids) -> the next-char probabilities after each id, fed from a zero
 * state, stream(prompt, length, options) -> an iterator of the text of each id drawn
 * (one char each for a char model; "" for a bpe id that ends inside a char), and
 * generate(the same) -> the text; options: temperature (0 is greedy), top_k, top_p,
 * seed, skip.
 */
"use strict";

(function () {
  const MUL1 = 0x7feb352d, MUL2 = 0x846ca68b, GOLDEN = 0x9e3779b9;
  const MIN_TEMPERATURE = 1e-6;
  // Milliseconds of generating between two repaints of the page.
  const SLICE_MS = 30;

  function tensor(spec) {
    const raw = atob(spec.data);
    const view = new DataView(new ArrayBuffer(raw.length));
    for (let i = 0; i < raw.length; i++) view.setUint8(i, raw.charCodeAt(i));
    const out = new Float32Array(raw.length / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
    return out;
  }

  // (rows, cols) -> (cols, rows): each output's weights become one contiguous row.
  function transposed(spec) {
    const [rows, cols] = spec.shape, a = tensor(spec), out = new Float32Array(a.length);
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) out[c * rows + r] = a[r * cols + c];
    }
    return out;
  }

  const sigmoid = (x) => 1 / (1 + Math.exp(-x));

  // lowbias32 on a non-negative integer below 2^53, as next_char._mix sees it in int64:
  // only the first shift can bring down bits above the 32nd.
  function mix(x) {
    x = ((x >>> 0) ^ (Math.floor(x / 65536) >>> 0)) >>> 0;
    x = Math.imul(x, MUL1) >>> 0;
    x = (x ^ (x >>> 15)) >>> 0;
    x = Math.imul(x, MUL2) >>> 0;
    return (x ^ (x >>> 16)) >>> 0;
  }

  function seedKey(seed) {
    const hi = Math.floor(seed / 4294967296);
    return mix((mix(hi + GOLDEN) ^ (seed >>> 0)) >>> 0);
  }

  // The (0, 1) number behind char v, from the key of the row's step, in float32 as in TF.
  function uniform(stepKey, v) {
    const x = mix((stepKey + (Math.imul(v, GOLDEN) >>> 0)) >>> 0);
    return Math.fround(Math.fround((x >>> 8) + 0.5) / 16777216);
  }

  function argmax(a) {
    let best = 0;
    for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
    return best;
  }

  // Picks the next id from masked logits; settings as in next_char.choose.
  function choose(logits, key, step, temperature, topK, topP) {
    if (!(temperature > 0)) return argmax(logits);
    const t = Math.fround(Math.max(temperature, MIN_TEMPERATURE));
    const scaled = Float64Array.from(logits, (l) => Math.fround(l / t));
    const width = scaled.length;
    if (topK > 0 || topP < 1) {
      const ordered = Float64Array.from(scaled).sort().reverse();
      let cutoff = ordered[width - 1];
      if (topK > 0) {
        const k = Math.min(topK, width);
        ordered.fill(-Infinity, k);
        cutoff = ordered[k - 1];
      }
      if (topP < 1) {
        const top = ordered[0];
        let total = 0;
        for (const o of ordered) total += Math.exp(o - top);
        let before = 0, kept = 0;
        for (const o of ordered) {
          if (before < topP) kept++;
          before += Math.exp(o - top) / total;
        }
        cutoff = Math.max(cutoff, ordered[Math.max(kept, 1) - 1]);
      }
      for (let v = 0; v < width; v++) if (scaled[v] < cutoff) scaled[v] = -Infinity;
    }
    const stepKey = mix((key ^ step) >>> 0);
    for (let v = 0; v < width; v++) {
      const gumbel = Math.fround(-Math.log(Math.fround(-Math.log(uniform(stepKey, v)))));
      scaled[v] = Math.fround(scaled[v] + gumbel);
    }
    return argmax(scaled);
  }

  class CharModel {
    constructor(spec) {
      if (spec.format !== "char-lstm-web" || ![1, 2].includes(spec.version) ||
          (spec.version === 2) !== !!spec.tokenizer) {
        throw new Error("model.js is not a char-lstm-web version 1 or 2 model");
      }
      this.info = spec.info || {};
      this.chars = spec.vocab.chars;
      this.lowercase = !!spec.vocab.lowercase;
      this.ids = new Map(this.chars.map((c, i) => [c, i + 1]));
      this.vocabSize = this.chars.length + 1;
      // A word or bpe model: its ids come from the tokenizer, not from the chars.
      this.tokenizer = spec.tokenizer ? window.charTokenizer.create(spec.tokenizer) : null;
      if (this.tokenizer) this.vocabSize = this.tokenizer.size;
      // Never drawn, as in Python: the out-of-vocabulary id, and any id whose text is
      // empty (a word model's <unk>, which only announces a spelled-out word).
      this.never = [0, ...(this.tokenizer ? this.tokenizer.silent : [])];
      this.embedding = tensor(spec.embedding);
      this.embeddingDim = spec.embedding.shape[1];
      let inputs = this.embeddingDim;
      this.layers = spec.lstms.map((l) => {
        const units = l.recurrent_kernel.shape[0], width = inputs + units;
        // Each gate unit's input and recurrent weights side by side, one row per unit.
        const kernel = transposed(l.kernel), recurrent = transposed(l.recurrent_kernel);
        const weights = new Float32Array(4 * units * width);
        for (let j = 0; j < 4 * units; j++) {
          weights.set(kernel.subarray(j * inputs, (j + 1) * inputs), j * width);
          weights.set(recurrent.subarray(j * units, (j + 1) * units), j * width + inputs);
        }
        const layer = { inputs, units, width, weights, bias: tensor(l.bias),
                        xh: new Float32Array(width), z: new Float64Array(4 * units) };
        inputs = units;
        return layer;
      });
      this.logitsKernel = transposed(spec.logits.kernel);
      this.logitsBias = tensor(spec.logits.bias);
      this.startId = this.tokenizer ? this.tokenizer.encode("\n")[0] || 0 :
        this.ids.get("\n") || 0;
    }

    // Zero (h, c) for every layer, bottom first.
    newState() {
      return this.layers.flatMap((l) => [new Float32Array(l.units), new Float32Array(l.units)]);
    }

    // One step: replaces `state` by the state after `id`; returns the raw logits.
    step(id, state) {
      let x = this.embedding.subarray(id * this.embeddingDim, (id + 1) * this.embeddingDim);
      this.layers.forEach((l, i) => {
        const h = state[2 * i], c = state[2 * i + 1], z = l.z, u = l.units, m = l.width;
        const xh = l.xh, w = l.weights;
        xh.set(x);
        xh.set(h, l.inputs);
        // Four rows at a time: each input value is read once for four dot products.
        for (let j = 0; j < 4 * u; j += 4) {
          let s0 = l.bias[j], s1 = l.bias[j + 1], s2 = l.bias[j + 2], s3 = l.bias[j + 3];
          const r0 = j * m, r1 = r0 + m, r2 = r1 + m, r3 = r2 + m;
          for (let k = 0; k < m; k++) {
            const v = xh[k];
            s0 += w[r0 + k] * v;
            s1 += w[r1 + k] * v;
            s2 += w[r2 + k] * v;
            s3 += w[r3 + k] * v;
          }
          z[j] = s0;
          z[j + 1] = s1;
          z[j + 2] = s2;
          z[j + 3] = s3;
        }
        const hNext = new Float32Array(u), cNext = new Float32Array(u);
        for (let k = 0; k < u; k++) {
          cNext[k] = sigmoid(z[u + k]) * c[k] + sigmoid(z[k]) * Math.tanh(z[2 * u + k]);
          hNext[k] = sigmoid(z[3 * u + k]) * Math.tanh(cNext[k]);
        }
        state[2 * i] = hNext;
        state[2 * i + 1] = cNext;
        x = hNext;
      });
      const logits = new Float32Array(this.vocabSize), u = x.length;
      for (let v = 0; v < this.vocabSize; v++) {
        let s = this.logitsBias[v];
        for (let k = 0; k < u; k++) s += this.logitsKernel[v * u + k] * x[k];
        logits[v] = s;
      }
      for (const id of this.never) logits[id] = -Infinity;
      return logits;
    }

    // Prompt text -> {ids, missing}, normalised as the training text was. (toLowerCase
    // and Python's str.lower differ for a few letters, such as the dotted capital I.)
    encode(text, skip) {
      text = text.replace(/\r\n/g, "\n");
      if (this.lowercase) text = text.toLowerCase();
      let ids = [], missing = new Set();
      if (this.tokenizer) {
        // As encode_prompt does: unknown chars are dropped before the text is split, so a
        // word tokenizer sees the rest of their word whole.
        missing = new Set(this.tokenizer.missing(text));
        if (missing.size) text = [...text].filter((c) => !missing.has(c)).join("");
        ids = this.tokenizer.encode(text).filter((id) => id !== 0);
      } else {
        for (const ch of text) {
          const id = this.ids.get(ch);
          if (id === undefined) missing.add(ch); else ids.push(id);
        }
      }
      if (missing.size && !skip) {
        const shown = [...missing].map((c) => JSON.stringify(c).replace(/^"|"$/g, "'"));
        throw new Error(`the prompt has ${missing.size} character(s) the model's vocabulary ` +
                        `lacks: ${shown.join(", ")} (tick "skip unknown characters" to drop them)`);
      }
      return { ids, missing: [...missing] };
    }

    // Feeds ids from a zero state; the next-char probabilities after each, as arrays.
    probabilities(ids) {
      const state = this.newState();
      return ids.map((id) => {
        const logits = this.step(id, state), top = Math.max(...logits);
        const e = Array.from(logits, (l) => Math.exp(l - top));
        const total = e.reduce((a, b) => a + b, 0);
        return e.map((p) => p / total);
      });
    }

    // Yields each generated char; options: temperature, top_k, top_p, seed, skip.
    *stream(prompt, length, options) {
      const o = { temperature: 0.8, top_k: 0, top_p: 1, seed: 0, skip: false, ...options };
      let ids = this.encode(prompt, o.skip).ids;
      if (!ids.length) ids = [this.startId];
      const state = this.newState(), key = seedKey(o.seed);
      let logits;
      for (const id of ids) logits = this.step(id, state);
      if (this.tokenizer) {
        yield* this.tokens(logits, state, key, length, o, ids);
        return;
      }
      for (let t = 0; t < length; t++) {
        const id = choose(logits, key, t, o.temperature, o.top_k, o.top_p);
        yield this.chars[id - 1];
        logits = this.step(id, state);
      }
    }

    // A word or bpe model's draw after the prompt's ids: ids until the text holds
    // `length` chars.
    *tokens(logits, state, key, length, o, prompt) {
      const decoder = this.tokenizer.decoder(), rule = this.tokenizer.utf8;
      let chars = 0, pending = 0;
      if (rule) for (const id of prompt) pending = rule.after(pending, id);
      // As in Python (tokens.MAX_IDS_PER_CHAR): at most 4 ids per char asked, so a
      // model that kept drawing ids without text could not hold the page forever.
      for (let t = 0; chars < length && t < 4 * length; t++) {
        if (rule) logits = rule.mask(logits, pending);
        const id = choose(logits, key, t, o.temperature, o.top_k, o.top_p);
        if (rule) pending = rule.after(pending, id);
        const text = decoder.feed(id);
        chars += [...text].length;
        yield text;
        if (chars < length) logits = this.step(id, state);
      }
      // Bytes of a character the last id left incomplete are dropped, as in Python
      // (tokens.OutputText): the text never ends in U+FFFD.
      decoder.flush();
    }

    generate(prompt, length, options) {
      return [...this.stream(prompt, length, options)].join("");
    }
  }

  const model = new CharModel(window.CHAR_MODEL);
  window.charModel = model;

  const $ = (id) => document.getElementById(id);
  if (!$("form")) return;
  const best = model.info.best || {};
  const units = model.layers.map((l) => l.units);
  const kind = model.tokenizer ? `${model.tokenizer.kind} tokens` : "chars";
  $("model").textContent = `${model.info.name || "model"} (runs in this page): ` +
    `${units.length} x LSTM(${units[0]}), embedding ${model.embeddingDim}, vocabulary ` +
    `${model.vocabSize} ${kind}` + (best.value === undefined ? "" :
      `; ${best.monitor || "val_loss"} ${Number(best.value).toFixed(4)}`) +
    (best.epoch ? ` at epoch ${best.epoch}` : "");

  function number(id, check, message) {
    const value = Number($(id).value);
    if ($(id).value === "" || !check(value)) throw new Error(`${id} ${message}`);
    return value;
  }

  function settings() {
    const seedText = $("seed").value;
    return {
      length: number("length", (v) => Number.isInteger(v) && v >= 0, "must be an integer >= 0"),
      temperature: number("temperature", (v) => Number.isFinite(v) && v >= 0,
        "must be a finite number >= 0"),
      top_k: number("top_k", (v) => Number.isInteger(v) && v >= 0, "must be an integer >= 0"),
      top_p: number("top_p", (v) => v > 0 && v <= 1, "must be in (0, 1]"),
      seed: seedText === "" ? Math.floor(Math.random() * 2147483648) :
        number("seed", (v) => Number.isSafeInteger(v) && v >= 0, "must be an integer >= 0"),
      skip: $("skip").checked,
    };
  }

  function generate(event) {
    event.preventDefault();
    const button = $("generate"), status = $("status"), out = $("text");
    status.className = "";
    $("prompt-echo").textContent = $("prompt").value;
    out.textContent = "";
    let s, chars;
    try {
      s = settings();
      chars = model.stream($("prompt").value, s.length, s);
    } catch (e) {
      status.className = "error";
      status.textContent = "error: " + e.message;
      return;
    }
    button.disabled = true;
    status.textContent = "generating...";
    const started = performance.now();
    let count = 0;
    // Runs in time slices so that the page repaints while it generates.
    function slice() {
      const until = performance.now() + SLICE_MS;
      let text = "", next;
      try {
        while (!(next = chars.next()).done) {
          text += next.value;
          if (performance.now() > until) break;
        }
      } catch (e) {
        status.className = "error";
        status.textContent = "error: " + e.message;
        button.disabled = false;
        return;
      }
      out.textContent += text;
      count += [...text].length;
      if (!next.done) {
        status.textContent = `generating... ${count} chars`;
        setTimeout(slice, 0);
        return;
      }
      const seconds = (performance.now() - started) / 1000;
      status.textContent = `done: ${count} chars in ${seconds.toFixed(2)} s, seed ${s.seed} ` +
        "(enter it to repeat this text)";
      button.disabled = false;
    }
    setTimeout(slice, 0);
  }
  $("form").addEventListener("submit", generate);
})();
