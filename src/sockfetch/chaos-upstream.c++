#include "chaos-upstream.h"

#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <ctype.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

namespace sockfetch {
namespace chaos {
namespace {

uint64_t hashText(kj::StringPtr text, uint64_t salt) {
  uint64_t h = 0xcbf29ce484222325ull ^ salt;  // FNV-1a, then mixed
  for (char c: text) h = (h ^ kj::byte(c)) * 0x100000001b3ull;
  return mix(h);
}

size_t padOf(kj::StringPtr url) {
  // The padding a request asks for (`?pad=N` at the end of its url).
  KJ_IF_SOME(at, url.findLast('=')) {
    return strtoul(url.slice(at + 1).cStr(), nullptr, 10);
  }
  return 0;
}

bool peerClosed(int fd) {
  // Whether the client already closed (FIN or RST) this connection, even if our event loop has
  // not read that yet: such a connection no longer counts as open.
  struct pollfd p = {fd, POLLRDHUP, 0};
  int n;
  KJ_SYSCALL(n = poll(&p, 1, 0));
  return n > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

kj::Maybe<size_t> headEnd(kj::ArrayPtr<const char> data) {
  for (size_t i = 0; i + 4 <= data.size(); i++) {
    if (memcmp(data.begin() + i, "\r\n\r\n", 4) == 0) return i + 4;
  }
  return nullptr;
}

kj::Maybe<kj::String> headerValue(kj::StringPtr head, kj::StringPtr lowerName) {
  // Case-insensitive lookup in a raw request head.
  auto lower = kj::heapString(head);
  for (auto& c: lower) c = tolower(c);
  auto needle = kj::str("\r\n", lowerName, ":");
  const char* found = strstr(lower.cStr(), needle.cStr());
  if (found == nullptr) return nullptr;
  size_t start = found - lower.cStr() + needle.size();
  while (start < head.size() && head[start] == ' ') start++;
  size_t end = start;
  while (end < head.size() && head[end] != '\r') end++;
  return kj::heapString(head.slice(start).begin(), end - start);
}

}  // namespace

uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

kj::String responseBodyFor(kj::StringPtr url) {
  size_t pad = padOf(url);
  uint64_t h = hashText(url, 1);
  auto body = kj::heapString(url.size() + 1 + pad);
  memcpy(body.begin(), url.begin(), url.size());
  body[url.size()] = '\n';
  for (size_t i = 0; i < pad; i++) body[url.size() + 1 + i] = 'a' + (h + i * 7) % 26;
  return body;
}

kj::String requestBodyFor(kj::StringPtr url, size_t size) {
  uint64_t h = hashText(url, 2);
  auto body = kj::heapString(size);
  for (size_t i = 0; i < size; i++) body[i] = 'A' + (h + i * 5) % 26;
  return body;
}

kj::String preview(kj::ArrayPtr<const char> bytes) {
  auto n = kj::min(bytes.size(), size_t(60));
  auto text = kj::heapString(bytes.begin(), n);
  for (auto& c: text) {
    if (c == '\r' || c == '\n') c = '|';
  }
  return kj::str('"', text, bytes.size() > n ? "...\"" : "\"");
}

void setNoDelay(kj::AsyncIoStream& stream) {
  KJ_IF_SOME(fd, stream.getFd()) {
    int one = 1;
    KJ_SYSCALL(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)));
  }
}

struct ChaosUpstream::Connection {
  ChaosUpstream& server;
  unsigned index;
  kj::Own<kj::AsyncIoStream> stream;
  int fd;
  kj::Vector<char> buffer;                 // received, not yet parsed
  kj::Maybe<kj::String> poisonedBy;        // the url whose answer was followed by unsolicited bytes
  bool reset = false;                      // close with RST rather than FIN
  kj::Maybe<kj::Duration> idleClose;       // while waiting for the next request
  kj::String lastUrl = kj::str("(none)");
  kj::StringPtr state = "waiting";
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> closeNow;

  Connection(ChaosUpstream& server, unsigned index, kj::Own<kj::AsyncIoStream> streamParam)
      : server(server), index(index), stream(kj::mv(streamParam)),
        fd(KJ_ASSERT_NONNULL(stream->getFd())) {
    server.connections.add(this);
  }
  ~Connection() noexcept(false) {
    if (reset) {
      struct linger lin = {1, 0};
      KJ_SYSCALL(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof(lin)));
    }
    test::forget(server.connections, this);
  }
  KJ_DISALLOW_COPY(Connection);

  void consume(size_t n) {
    kj::Vector<char> rest;
    rest.addAll(buffer.begin() + n, buffer.end());
    buffer = kj::mv(rest);
  }
};

void ChaosUpstream::closeAll() {
  for (auto c: connections) {
    KJ_IF_SOME(f, c->closeNow) {
      if (f->isWaiting()) f->fulfill();
    }
  }
}

kj::Promise<void> ChaosUpstream::acceptLoop() {
  return listener->accept().then([this](kj::Own<kj::AsyncIoStream>&& stream) {
    setNoDelay(*stream);
    // Counted when the upstream takes the connection: by then every connection the pool closed
    // before opening this one has sent its FIN (the pool closes within the event that drops it,
    // or in the next), which peerClosed() sees even if our reads have not got there.
    unsigned open = 1;
    kj::Vector<kj::String> others;
    for (auto c: connections) {
      if (!peerClosed(c->fd)) {
        ++open;
        kj::String client = kj::str("");
        KJ_IF_SOME(describe, describeClient) {
          client = kj::str(" [client: ", describe(c->lastUrl), "]");
        }
        others.add(kj::str("#", c->index, " ", c->state, " ", c->lastUrl, client));
      }
    }
    maxOpen = kj::max(maxOpen, open);
    if (open > maxConnections) {
      violations.add(kj::str("connection #", accepted, " made ", open, " connections open at once "
          "(maxConnections = ", maxConnections, "; the others: ", kj::strArray(others, ", "),
          ")"));
    }
    auto connection = kj::heap<Connection>(*this, accepted++, kj::mv(stream));
    auto& ref = *connection;
    tasks.add(awaitHead(ref).attach(kj::mv(connection)));
    return acceptLoop();
  });
}

kj::Promise<bool> ChaosUpstream::fill(Connection& c) {
  // Reads what is there into the connection's buffer; false at the end of the stream.
  auto chunk = kj::heapArray<char>(16384);
  auto read = c.stream->tryRead(chunk.begin(), 1, chunk.size());
  return read.then([&c, chunk = kj::mv(chunk)](size_t n) {
    c.buffer.addAll(chunk.begin(), chunk.begin() + n);
    return n > 0;
  });
}

kj::Promise<void> ChaosUpstream::awaitHead(Connection& c) {
  KJ_IF_SOME(size, headEnd(c.buffer.asPtr())) {
    return handle(c, size);
  }
  auto more = fill(c);
  if (c.buffer.size() == 0) {
    // Between requests: closeAll(), or the last answer's idle close, may end the connection.
    auto paf = kj::newPromiseAndFulfiller<void>();
    c.closeNow = kj::mv(paf.fulfiller);
    kj::Promise<void> close = kj::mv(paf.promise);
    KJ_IF_SOME(delay, c.idleClose) {
      close = close.exclusiveJoin(timer.afterDelay(delay));
    }
    more = more.exclusiveJoin(close.then([]() { return false; }));
  }
  return more.then([this, &c](bool got) -> kj::Promise<void> {
    c.closeNow = nullptr;
    if (!got) return kj::READY_NOW;  // returning closes the connection
    return awaitHead(c);
  });
}

Behaviour ChaosUpstream::choose(kj::StringPtr url, unsigned attempt, bool hasBody) {
  // A function of the seed, the url (which is unique) and the attempt: the same script whatever
  // order the requests arrive in.
  Behaviour b;
  KJ_IF_SOME(f, forced) {
    return f;
  }
  if (calm) return b;
  Rng rng(hashText(url, seed * 1000003 + attempt));
  unsigned roll = rng.below(100);
  b.fault = roll < 7    ? Fault::CLOSE_SILENTLY
      : roll < 12       ? Fault::RESET_BEFORE
      : roll < 17       ? Fault::RESET_MID
      : roll < 21       ? Fault::RESET_AFTER
                        : Fault::NONE;
  b.chunked = rng.chance(45);
  b.trailer = b.chunked && rng.chance(20);
  b.interim = rng.chance(10) ? 1 + rng.below(2) : 0;
  b.connectionClose = rng.chance(10);
  b.earlyAnswer = hasBody && rng.chance(30);
  b.trickle = rng.chance(25);
  unsigned afterRoll = rng.below(100);
  b.after = afterRoll < 4 ? After::GARBAGE
      : afterRoll < 8     ? After::SECOND_RESPONSE
                          : After::NOTHING;
  if (rng.chance(20)) b.delay = rng.below(15) * kj::MILLISECONDS;
  if (rng.chance(12)) b.idleClose = rng.below(8) * kj::MILLISECONDS;
  return b;
}

kj::Promise<void> ChaosUpstream::handle(Connection& c, size_t headSize) {
  auto head = kj::heapString(c.buffer.begin(), headSize);
  c.consume(headSize);
  c.idleClose = nullptr;
  ++requests;
  c.state = "reading the body of";
  auto space1 = KJ_ASSERT_NONNULL(head.findFirst(' '));
  auto rest = head.slice(space1 + 1);
  auto url = kj::heapString(rest.begin(), KJ_ASSERT_NONNULL(rest.findFirst(' ')));
  c.lastUrl = kj::heapString(url);
  KJ_IF_SOME(earlier, c.poisonedBy) {
    violations.add(kj::str("request ", url, " arrived on connection #", c.index, " after the "
        "upstream had sent unsolicited bytes behind the answer to ", earlier, ": the pool reused "
        "a poisoned connection"));
  }
  bool hasBody = headerValue(head, "content-length") != nullptr ||
      headerValue(head, "transfer-encoding") != nullptr;

  Seen* record;
  KJ_IF_SOME(s, seen.find(url)) {
    record = &s;
  } else {
    record = &seen.insert(kj::heapString(url), Seen()).value;
  }
  auto b = choose(url, ++record->attempts, hasBody);
  record->lastBenign = b.fault == Fault::NONE;
  record->lastAnswered = false;
  record->lastBehaviour = b.describe();

  if (b.earlyAnswer) {
    // Answers before reading the body (no pipelining watch: the body is still coming), then
    // reads and discards it, as a server that keeps the connection must.
    return answer(c, b, url, false).then([this, &c, head = kj::mv(head), url = kj::mv(url)](
        bool keep) mutable -> kj::Promise<void> {
      if (!keep) return kj::READY_NOW;
      return readBody(c, head).then([this, &c, head = kj::mv(head), url = kj::mv(url)](
          kj::String body) {
        checkBody(url, head, body);
        return awaitHead(c);
      });
    });
  }
  auto body = readBody(c, head);
  return body.then([this, &c, head = kj::mv(head), url = kj::mv(url), b = kj::mv(b)](
      kj::String body) mutable {
    checkBody(url, head, body);
    if (c.buffer.size() > 0) {
      violations.add(kj::str("connection #", c.index, " received ", preview(c.buffer.asPtr()),
          " right behind request ", url, ", before its answer: the pool pipelined a request"));
    }
    return answer(c, b, url, true).then([this, &c](bool keep) -> kj::Promise<void> {
      if (!keep) return kj::READY_NOW;
      return awaitHead(c);
    });
  });
}

kj::Promise<kj::String> ChaosUpstream::readBody(Connection& c, kj::StringPtr head) {
  KJ_IF_SOME(length, headerValue(head, "content-length")) {
    size_t n = length.parseAs<size_t>();
    if (c.buffer.size() >= n) {
      auto body = kj::heapString(c.buffer.begin(), n);
      c.consume(n);
      return kj::mv(body);
    }
    return fill(c).then([this, &c, head = kj::heapString(head)](bool got) {
      if (!got) {
        kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "the client closed inside a body"));
      }
      return readBody(c, head);
    });
  }
  if (headerValue(head, "transfer-encoding") != nullptr) return readChunked(c, kj::str(""));
  return kj::str("");
}

kj::Promise<kj::String> ChaosUpstream::readChunked(Connection& c, kj::String sofar) {
  // Takes every complete chunk in the buffer; kj-http sends no trailers.
  for (;;) {
    auto data = c.buffer.asPtr();
    if (data.size() == 0) break;
    const char* nl = reinterpret_cast<const char*>(memchr(data.begin(), '\n', data.size()));
    if (nl == nullptr) break;
    size_t lineSize = nl - data.begin() + 1;
    size_t size = strtoul(data.begin(), nullptr, 16);
    if (size == 0) {
      if (data.size() < lineSize + 2) break;
      c.consume(lineSize + 2);
      return kj::mv(sofar);
    }
    if (data.size() < lineSize + size + 2) break;
    sofar = kj::str(sofar, kj::arrayPtr(data.begin() + lineSize, size));
    c.consume(lineSize + size + 2);
  }
  return fill(c).then([this, &c, sofar = kj::mv(sofar)](bool got) mutable {
    if (!got) {
      kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "the client closed inside a body"));
    }
    return readChunked(c, kj::mv(sofar));
  });
}

void ChaosUpstream::checkBody(kj::StringPtr url, kj::StringPtr head, kj::StringPtr body) {
  // Whatever body arrived must be the start of the one the client writes for this url (a
  // chunked body may legitimately end early: the client dropped it).
  auto expected = requestBodyFor(url, body.size());
  if (body != expected) {
    violations.add(kj::str("request ", url, " arrived with a body that is not its own: ",
        preview(body.asArray()), " instead of ", preview(expected.asArray())));
  }
  KJ_IF_SOME(length, headerValue(head, "content-length")) {
    if (length.parseAs<size_t>() != body.size()) {
      violations.add(kj::str("request ", url, " declared ", length, " body bytes, got ",
          body.size()));
    }
  }
}

kj::Promise<bool> ChaosUpstream::answer(Connection& c, const Behaviour& b, kj::StringPtr url,
    bool watch) {
  // Writes the answer the behaviour calls for; resolves to whether the connection stays open.
  Rng rng(hashText(url, seed + 77));
  if (b.fault == Fault::CLOSE_SILENTLY || b.fault == Fault::RESET_BEFORE) {
    c.reset = b.fault == Fault::RESET_BEFORE;
    return false;
  }

  auto body = responseBodyFor(url);
  kj::Vector<kj::String> parts;
  if (b.interim >= 2) parts.add(kj::str("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"));
  if (b.interim >= 1) parts.add(kj::str("HTTP/1.1 100 Continue\r\n\r\n"));
  parts.add(kj::str("HTTP/1.1 200 OK\r\nServer: chaos\r\n",
      b.connectionClose ? "Connection: close\r\n" : "",
      b.chunked ? kj::str("Transfer-Encoding: chunked\r\n")
                : kj::str("Content-Length: ", body.size(), "\r\n"),
      "\r\n"));
  if (b.chunked) {
    size_t at = 0;
    while (at < body.size()) {
      size_t n = kj::min(body.size() - at, rng.between(1, 5000));
      parts.add(kj::str(kj::hex(n), "\r\n", kj::arrayPtr(body.begin() + at, n), "\r\n"));
      at += n;
    }
    parts.add(kj::str("0\r\n", b.trailer ? "X-Checksum: none\r\n" : "", "\r\n"));
  } else {
    parts.add(kj::mv(body));
  }
  auto whole = kj::strArray(parts, "");
  size_t answerSize = whole.size();
  // Bytes behind the answer must reach the client before it can send another request, or they
  // would cross it and be (rightly) taken as its response: they go in the same write as the end
  // of the answer, and only behind a small one, which that write is sure to take whole.
  auto after = answerSize <= 4096 ? b.after : After::NOTHING;
  switch (after) {
    case After::NOTHING: break;
    case After::GARBAGE: whole = kj::str(whole, "\x01\x02 not http \xff"); break;
    case After::SECOND_RESPONSE:
      whole = kj::str(whole, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL");
      break;
  }
  if (after != After::NOTHING && b.fault == Fault::NONE) c.poisonedBy = kj::heapString(url);

  size_t total = whole.size();
  if (b.fault == Fault::RESET_MID) total = rng.between(1, whole.size() - 1);
  // Cut points: one write, or several a little apart, all before the end of the answer.
  kj::Vector<size_t> cuts;
  size_t lastCut = kj::min(total, answerSize) - 1;
  if (b.trickle && lastCut >= 1) {
    unsigned pieces = 2 + rng.below(5);
    for (unsigned i = 0; i < pieces; i++) cuts.add(rng.between(1, lastCut));
  }
  cuts.add(total);
  kj::Vector<size_t> sorted;
  size_t last = 0;
  for (;;) {
    size_t next = total;
    for (auto cut: cuts) {
      if (cut > last && cut < next) next = cut;
    }
    sorted.add(next);
    last = next;
    if (next == total) break;
  }
  bool keep = b.fault == Fault::NONE && !b.connectionClose;
  if (b.fault == Fault::RESET_MID || b.fault == Fault::RESET_AFTER) c.reset = true;

  struct Plan {
    kj::String bytes;
    kj::Vector<size_t> ends;
    size_t index = 0;
    size_t at = 0;
    kj::Duration pause;
  };
  auto plan = kj::heap<Plan>();
  plan->bytes = kj::mv(whole);
  plan->ends = kj::mv(sorted);
  plan->pause = b.trickle ? rng.below(3) * kj::MILLISECONDS : 0 * kj::MILLISECONDS;
  auto* p = plan.get();

  // A loop over the pieces, after the delay.
  struct Writer {
    static kj::Promise<void> next(kj::AsyncIoStream& out, kj::Timer& timer, Plan& p) {
      if (p.index == p.ends.size()) return kj::READY_NOW;
      size_t end = p.ends[p.index++];
      auto piece = kj::arrayPtr(p.bytes.begin() + p.at, end - p.at);
      p.at = end;
      return writeAll(out, piece.asBytes()).then([&out, &timer, &p]() {
        if (p.index == p.ends.size()) return kj::Promise<void>(kj::READY_NOW);
        return timer.afterDelay(p.pause).then([&out, &timer, &p]() {
          return next(out, timer, p);
        });
      });
    }
  };
  c.state = "answering";
  kj::Promise<void> writes = timer.afterDelay(b.delay).then([this, &c, p]() {
    return Writer::next(*c.stream, timer, *p);
  });
  if (watch) {
    // The request was read to its end: any byte from the client before the answer is written
    // is a second request on the connection.
    auto pipelined = fill(c).then([this, &c, url = kj::heapString(url)](bool got) {
      if (got) {
        violations.add(kj::str("connection #", c.index, " received ", preview(c.buffer.asPtr()),
            " while it was answering ", url, ": the pool pipelined a request"));
      }
      return kj::Promise<void>(kj::NEVER_DONE);
    }, [](kj::Exception&&) { return kj::Promise<void>(kj::NEVER_DONE); });
    writes = writes.exclusiveJoin(kj::mv(pipelined));
  }
  auto idleClose = b.idleClose;
  // Looked up again at the end: the map moves its entries as it grows.
  return writes.then([this, &c, url = kj::heapString(url), keep, idleClose]() {
    KJ_ASSERT_NONNULL(seen.find(url)).lastAnswered = true;
    c.state = "answered";
    c.idleClose = idleClose;
    return keep;
  }).attach(kj::mv(plan));
}

}  // namespace chaos
}  // namespace sockfetch
