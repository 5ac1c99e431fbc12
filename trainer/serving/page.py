"""The page `trainer.serve` shows at `/`: a prompt box, the settings, the text as it streams.

Plain HTML and JavaScript with no external files (the server may have no
Internet). The script reads /info for the model's description and POSTs to
/stream, reading the server-sent events from the response body as they arrive
(EventSource cannot POST).

The style and the form are shared with the page that `trainer.export --format=web`
writes, so the two look and read alike.
"""

import base64
import hashlib
import re

STYLE = """
  body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em;
         color: #222; }
  h1 { font-size: 1.4em; margin-bottom: .2em; }
  #model { color: #555; font-size: .9em; margin-bottom: 1em; }
  textarea { width: 100%; height: 5em; font-family: monospace; font-size: 1em; }
  fieldset { border: 1px solid #ccc; display: flex; flex-wrap: wrap; gap: .4em 1.2em; }
  label { white-space: nowrap; }
  input[type=number] { width: 6em; }
  #output { white-space: pre-wrap; font-family: monospace; background: #f6f6f6;
            border: 1px solid #ddd; padding: .8em; min-height: 8em; }
  #prompt-echo { color: #888; }
  #status { color: #555; font-size: .9em; margin: .5em 0; }
  .error { color: #b00; }
"""

FORM = """<form id="form" novalidate>
  <textarea id="prompt" name="prompt" placeholder="A prompt to continue">ROMEO:</textarea>
  <fieldset>
    <label>length <input type="number" id="length" min="0" value="500"></label>
    <label>temperature <input type="number" id="temperature" min="0" step="any"
      value="0.8"></label>
    <label>top_k <input type="number" id="top_k" min="0" value="0"></label>
    <label>top_p <input type="number" id="top_p" min="0" max="1" step="any"
      value="1"></label>
    <label>seed <input type="number" id="seed" min="0" placeholder="random"></label>
    <label><input type="checkbox" id="skip"> skip unknown characters</label>
    <button type="submit" id="generate">Generate</button>
  </fieldset>
</form>
<div id="status"></div>
<div id="output"><span id="prompt-echo"></span><span id="text"></span></div>
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>char-lstm</title>
<style>""" + STYLE + """</style>
</head>
<body>
<h1>Character-level LSTM</h1>
<div id="model">loading the model's description...</div>
""" + FORM + """<script>
const $ = (id) => document.getElementById(id);

fetch("/info").then((r) => r.json()).then((info) => {
  const c = info.config || {}, best = info.best || {};
  const loss = best.value === undefined ? "n/a" : Number(best.value).toFixed(4);
  $("model").textContent = `${info.name} (${info.kind}): ${c.num_layers} x LSTM(${c.rnn_units}),` +
    ` embedding ${c.embedding_dim}, vocabulary ${info.vocab_size} ` +
    `${!info.tokenizer || info.tokenizer === "char" ? "chars" : info.tokenizer + " tokens"}; ` +
    `${best.monitor || "val_loss"} ${loss}` + (best.epoch ? ` at epoch ${best.epoch}` : "") +
    `; up to ${info.limits.max_length} chars per request`;
}).catch((e) => { $("model").textContent = "no model description: " + e; });

function request() {
  const body = { prompt: $("prompt").value, oov: $("skip").checked ? "skip" : "error" };
  for (const key of ["length", "temperature", "top_k", "top_p", "seed"]) {
    if ($(key).value !== "") body[key] = Number($(key).value);
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate"), status = $("status"), out = $("text");
  button.disabled = true;
  status.className = "";
  status.textContent = "generating...";
  $("prompt-echo").textContent = $("prompt").value;
  out.textContent = "";
  const started = performance.now();
  let chars = 0;
  try {
    const response = await fetch("/stream", { method: "POST", body: JSON.stringify(request()),
                                              headers: { "Content-Type": "application/json" } });
    if (!response.ok) throw new Error((await response.json()).error);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const kind = (message.match(/^event: (.*)$/m) || [null, "message"])[1];
        const data = JSON.parse((message.match(/^data: (.*)$/m) || [null, "{}"])[1]);
        if (kind === "error") throw new Error(data.error);
        if (kind === "done") {
          const seconds = (performance.now() - started) / 1000;
          status.textContent = `done: ${chars} chars in ${seconds.toFixed(2)} s, seed ` +
            `${data.seed} (enter it to repeat this text)`;
        } else {
          out.textContent += data.text;
          chars += data.text.length;
          status.textContent = `generating... ${chars} chars`;
        }
      }
    }
  } catch (e) {
    status.className = "error";
    status.textContent = "error: " + e.message;
  } finally {
    button.disabled = false;
  }
}
$("form").addEventListener("submit", generate);
</script>
</body>
</html>
"""


def _hashes(tag: str) -> str:
    """CSP hashes of the page's inline `tag` elements: these run, nothing else does."""
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, re.S))


# Sent with the page: no script, style or frame from elsewhere, no framing by other
# sites (clickjacking), and no content-type guessing.
HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {_hashes('script')}; "
                               f"style-src {_hashes('style')}; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
