/**
 * A Server-Sent Events parser (the WHATWG HTML "event stream" interpretation), for a stream read with `fetch`
 * (an `EventSource` cannot send the `Authorization` and `X-Firstmile-Identity` headers).
 *
 * Lines end with CRLF, LF or CR, also when a chunk ends between the CR and the LF; a line starting with `:` is
 * a comment; `field: value` sets `event`, appends to `data` (lines joined with `\n`), sets `id` (unless it holds
 * NUL) or `retry` (ASCII digits only); a blank line dispatches the event (none when no `data` came). Unknown
 * fields are ignored; what is pending when the stream ends is discarded.
 */

export interface SseEvent {
  /** The `event` field, `message` by default. */
  type: string;
  data: string;
  /** The last event id seen on this stream (it persists across events, as the spec says). */
  id: string;
}

export interface SseHandlers {
  onEvent(event: SseEvent): void;
  onRetry?(ms: number): void;
  onComment?(text: string): void;
}

export class SseParser {
  private buffer = "";
  private skipLF = false;
  private started = false;
  private data: string[] = [];
  private type = "";
  private lastId = "";

  constructor(private readonly handlers: SseHandlers) {}

  /** Feed decoded text; complete lines are interpreted at once, a partial line waits for the next chunk. */
  feed(chunk: string): void {
    if (!this.started && chunk.length > 0) {
      this.started = true;
      if (chunk.charCodeAt(0) === 0xfeff) chunk = chunk.slice(1);
    }
    if (this.skipLF && chunk.length > 0) {
      this.skipLF = false;
      if (chunk[0] === "\n") chunk = chunk.slice(1);
    }
    let text = this.buffer + chunk;
    let start = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (c !== "\r" && c !== "\n") continue;
      this.line(text.slice(start, i));
      if (c === "\r") {
        if (i + 1 === text.length) this.skipLF = true;
        else if (text[i + 1] === "\n") i++;
      }
      start = i + 1;
    }
    text = text.slice(start);
    this.buffer = text;
  }

  private line(line: string): void {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line[0] === ":") {
      this.handlers.onComment?.(line.slice(1).replace(/^ /, ""));
      return;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    switch (field) {
      case "event":
        this.type = value;
        break;
      case "data":
        this.data.push(value);
        break;
      case "id":
        if (!value.includes("\0")) this.lastId = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.handlers.onRetry?.(parseInt(value, 10));
        break;
      default:
        break;
    }
  }

  private dispatch(): void {
    const data = this.data;
    const type = this.type;
    this.data = [];
    this.type = "";
    if (data.length === 0) return;
    this.handlers.onEvent({ type: type || "message", data: data.join("\n"), id: this.lastId });
  }
}

/**
 * Read a response body to its end, feeding `parser`; `onChunk` is called for every chunk (a keep-alive for an idle
 * watchdog). Rejects when the read fails (an abort included).
 */
export async function readEventStream(
  body: ReadableStream<Uint8Array>,
  parser: SseParser,
  onChunk?: () => void,
): Promise<void> {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      onChunk?.();
      parser.feed(decoder.decode(value, { stream: true }));
    }
    parser.feed(decoder.decode());
  } finally {
    reader.releaseLock();
  }
}
