// The console's client of the HTTP API: the bearer token (kept in this browser, sent as a header,
// never put in a URL), JSON calls with the API's error format, chunked uploads, and streamed
// answers (SSE over fetch: EventSource can neither POST nor send a header).

const TOKEN_KEY = "streamkv.token";

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY),
  set: (value) => localStorage.setItem(TOKEN_KEY, value),
  clear: () => localStorage.removeItem(TOKEN_KEY),
};

function headers(extra = {}) {
  const value = token.get();
  return value ? { ...extra, Authorization: `Bearer ${value}` } : extra;
}

async function failure(response) {
  let type = "http_error", message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    ({ type, message } = body.error || { type, message });
  } catch { /* not the API's JSON error */ }
  return new ApiError(response.status, type, message);
}

export async function call(method, path, body = undefined) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

export const api = {
  models: () => call("GET", "/v1/models"),
  streams: () => call("GET", "/v1/streams"),
  create: (spec) => call("POST", "/v1/streams", spec),
  remove: (id) => call("DELETE", `/v1/streams/${encodeURIComponent(id)}`),
  close: (id) => call("POST", `/v1/streams/${encodeURIComponent(id)}/close`),
  timeline: (id, after) => call("GET", `/v1/streams/${encodeURIComponent(id)}/timeline?after=${after}&limit=200`),
};

// A thumbnail as an object URL (an <img src> could not send the token).
export async function thumbnailURL(id, frame) {
  const response = await fetch(`/v1/streams/${encodeURIComponent(id)}/thumbnails/${frame}`, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return { url: URL.createObjectURL(await response.blob()), frame: Number(response.headers.get("X-Thumbnail-Frame")) };
}

// A file into a push-mode stream in numbered chunks, then the source is closed.
export async function upload(id, file, onProgress, chunkBytes = 512 * 1024) {
  for (let seq = 0, offset = 0; offset < file.size; seq += 1, offset += chunkBytes) {
    const response = await fetch(`/v1/streams/${encodeURIComponent(id)}/chunks?seq=${seq}`, {
      method: "POST", headers: headers({ "Content-Type": "application/octet-stream" }),
      body: file.slice(offset, offset + chunkBytes),
    });
    if (!response.ok) throw await failure(response);
    onProgress(Math.min(1, (offset + chunkBytes) / file.size));
  }
  return api.close(id);
}

// Ask with stream: true; onEvent gets each chat.completion.chunk as it arrives.
export async function askStream(model, id, question, onEvent, maxTokens = 64) {
  const body = {
    model, stream: true, max_tokens: maxTokens,
    messages: [{ role: "user", content: [
      { type: "video_url", video_url: { url: `stream://${id}` } }, { type: "text", text: question }] }],
  };
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError(0, "incomplete", "the answer ended before [DONE]");
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.type, chunk.error.message);
      onEvent(chunk);
    }
  }
}
