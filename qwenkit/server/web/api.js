// The page's client for this server's own API: GET /web/config and a streaming POST /v1/chat/completions.
//
// Errors come back as ApiError with the server's status, message and code (the server's error shape is
// {"error": {"message", "type", "param", "code"}}); describeError turns one into a sentence for the page.
// Stopping a reply is the caller's AbortSignal: fetch rejects with an AbortError and the server, seeing the
// connection close, cancels the sequence.

export class ApiError extends Error {
  constructor(status, message, code = null, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function headers(apiKey) {
  const out = { "Content-Type": "application/json" };
  if (apiKey) out.Authorization = `Bearer ${apiKey}`;
  return out;
}

async function errorFrom(response) {
  let message = response.statusText || "request failed";
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = String(body.error.message ?? message);
      code = body.error.code ?? null;
    }
  } catch {
    // Not JSON (a proxy's page, say): keep the status text.
  }
  return new ApiError(response.status, message, code, response.headers.get("Retry-After"));
}

/** {model, max_model_len, defaults: {temperature, top_p, max_tokens}} */
export async function getConfig(apiKey) {
  const response = await fetch("/web/config", { headers: headers(apiKey), cache: "no-store" });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

/**
 * Stream a chat completion: yields {content} for each text delta, {finish} with the finish reason and
 * {usage} once at the end (the server sends it because the request asks with stream_options.include_usage).
 */
export async function* streamChat(body, apiKey, signal) {
  const request = { ...body, stream: true, stream_options: { include_usage: true } };
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify(request),
    signal,
    cache: "no-store",
  });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end = buffer.indexOf("\n\n");
      while (end >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        end = buffer.indexOf("\n\n");
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield* parseChunk(JSON.parse(data));
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function* parseChunk(chunk) {
  if (chunk.error) {
    throw new ApiError(500, String(chunk.error.message ?? "generation failed"), chunk.error.code ?? null);
  }
  for (const choice of chunk.choices ?? []) {
    if (choice.index !== 0) continue;
    const content = choice.delta?.content;
    if (content) yield { content };
    if (choice.finish_reason) yield { finish: choice.finish_reason };
  }
  if (chunk.usage) yield { usage: chunk.usage };
}

/** One sentence for the page about a failed request. */
export function describeError(err) {
  if (!(err instanceof ApiError)) return `Could not reach the server: ${err.message}`;
  if (err.code === "context_length_exceeded") {
    return `The conversation is too long for the model's context: ${err.message} Start a new chat, clear this one, or edit an earlier message.`;
  }
  if (err.status === 429) {
    const wait = err.retryAfter ? ` Retry in ${err.retryAfter} s.` : "";
    return `The server is busy (429): ${err.message}${wait}`;
  }
  if (err.status === 503) return `The server is not ready (503): ${err.message}`;
  if (err.status === 401) return `The API key was not accepted (401): ${err.message}`;
  return `Error ${err.status}: ${err.message}`;
}
