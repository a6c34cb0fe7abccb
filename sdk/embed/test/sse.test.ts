import { describe, expect, test } from "vitest";
import { SseParser, readEventStream, type SseEvent } from "../src/sse";

function parse(...chunks: string[]): { events: SseEvent[]; retries: number[]; comments: string[] } {
  const events: SseEvent[] = [];
  const retries: number[] = [];
  const comments: string[] = [];
  const parser = new SseParser({
    onEvent: (e) => events.push(e),
    onRetry: (ms) => retries.push(ms),
    onComment: (c) => comments.push(c),
  });
  for (const chunk of chunks) parser.feed(chunk);
  return { events, retries, comments };
}

describe("SseParser", () => {
  test("an event with its type, data and id", () => {
    const { events } = parse('event: checklist\nid: 7\ndata: {"a":1}\n\n');
    expect(events).toEqual([{ type: "checklist", data: '{"a":1}', id: "7" }]);
  });

  test("the type defaults to message and is reset after each event; the id persists", () => {
    const { events } = parse("event: checklist\ndata: one\nid: a1\n\ndata: two\n\nid: b2\ndata: three\n\n");
    expect(events).toEqual([
      { type: "checklist", data: "one", id: "a1" },
      { type: "message", data: "two", id: "a1" },
      { type: "message", data: "three", id: "b2" },
    ]);
  });

  test("multi-line data is joined with LF, without the last LF", () => {
    const { events } = parse("data: first\ndata: second\ndata:\ndata: fourth\n\n");
    expect(events).toEqual([{ type: "message", data: "first\nsecond\n\nfourth", id: "" }]);
  });

  test("comments are not events", () => {
    const { events, comments } = parse(": open\n\n: keep-alive\n\n:\ndata: x\n\n");
    expect(comments).toEqual(["open", "keep-alive", ""]);
    expect(events).toEqual([{ type: "message", data: "x", id: "" }]);
  });

  test("retry takes ASCII digits only", () => {
    const { retries, events } = parse("retry: 5000\n\nretry: 10s\nretry: -1\nretry:\nretry: 250\n\n");
    expect(retries).toEqual([5000, 250]);
    expect(events).toEqual([]);
  });

  test("CRLF, CR and LF line ends, mixed", () => {
    const { events } = parse("event: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\rdata: 3\n\n");
    expect(events.map((e) => [e.type, e.data])).toEqual([["a", "1"], ["b", "2"], ["message", "3"]]);
  });

  test("a chunk boundary between CR and LF is one line end", () => {
    const { events } = parse("data: a\r", "\ndata: b\r", "\n\r", "\n");
    expect(events).toEqual([{ type: "message", data: "a\nb", id: "" }]);
  });

  test("chunks split mid-line and mid-field name give the same events", () => {
    const text = 'retry: 3000\n: open\n\nevent: checklist\ndata: {"steps":[1,2]}\n\nid: s-1\nevent: message\ndata: {"x":"é"}\n\n';
    const whole = parse(text);
    expect(whole.events).toHaveLength(2);
    for (let cut = 1; cut < text.length; cut++) {
      expect(parse(text.slice(0, cut), text.slice(cut)).events).toEqual(whole.events);
    }
    expect(parse(...text.split("")).events).toEqual(whole.events);
    expect(parse(...text.split("")).retries).toEqual([3000]);
  });

  test("one leading space of a value is removed, not more; a field without a colon has an empty value", () => {
    const { events } = parse("data:  two spaces\n\ndata:nospace\n\ndata\n\n");
    expect(events.map((e) => e.data)).toEqual([" two spaces", "nospace", ""]);
  });

  test("an event without data is not dispatched, unknown fields are ignored", () => {
    const { events } = parse("event: checklist\n\nfoo: bar\ndata: y\n\n");
    expect(events).toEqual([{ type: "message", data: "y", id: "" }]);
  });

  test("an id holding NUL is ignored", () => {
    const { events } = parse("id: good\ndata: 1\n\nid: ba\0d\ndata: 2\n\n");
    expect(events.map((e) => e.id)).toEqual(["good", "good"]);
  });

  test("a leading BOM is skipped; an event not ended by a blank line is not dispatched", () => {
    const { events } = parse("\uFEFFdata: a\n\ndata: unfinished\n");
    expect(events).toEqual([{ type: "message", data: "a", id: "" }]);
  });
});

describe("readEventStream", () => {
  test("decodes UTF-8 split across chunks and reports each chunk", async () => {
    const bytes = new TextEncoder().encode("event: message\ndata: héllo ✓\n\n");
    const cut = bytes.indexOf(0xc3) + 1; // in the middle of "é"
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(bytes.slice(0, cut));
        c.enqueue(bytes.slice(cut));
        c.close();
      },
    });
    const events: SseEvent[] = [];
    let chunks = 0;
    await readEventStream(body, new SseParser({ onEvent: (e) => events.push(e) }), () => chunks++);
    expect(events).toEqual([{ type: "message", data: "héllo ✓", id: "" }]);
    expect(chunks).toBe(2);
  });
});
