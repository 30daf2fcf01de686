#pragma once
// A raw socket end driven by a test (a downstream client of a proxy, or an upstream's end of a
// connection the proxy opened), and bounded waits: shared by the suites that run sockfetch behind
// kj::HttpServer (proxy-e2e-test, gateway-review-test).

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/async-io.h>
#include <kj/debug.h>
#include <ctype.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

namespace sockfetch {
namespace test {

// =================================================================================================
// Bounded waits and a raw socket end driven by the test

template <typename T>
T within(LoopEnv& env, kj::Promise<T> promise, kj::StringPtr what) {
  // Waits for `promise`, failing the test (saying what it waited for) instead of hanging.
  return promise.exclusiveJoin(env.timer.afterDelay(env.limit).then([what]() -> T {
    KJ_FAIL_ASSERT("timed out: nothing happened within the limit", what);
  })).wait(env.ws);
}

inline void within(LoopEnv& env, kj::Promise<void> promise, kj::StringPtr what) {
  promise.exclusiveJoin(env.timer.afterDelay(env.limit).then([what]() {
    KJ_FAIL_ASSERT("timed out: nothing happened within the limit", what);
  })).wait(env.ws);
}

inline kj::Maybe<kj::String> headerOf(kj::StringPtr head, kj::StringPtr name) {
  // A header's value in a raw head (case-insensitive name; the first occurrence).
  size_t pos = 0;
  while (pos < head.size()) {
    const char* eol = strstr(head.cStr() + pos, "\r\n");
    size_t end = eol == nullptr ? head.size() : eol - head.cStr();
    if (pos > 0) {
      auto line = kj::heapString(head.cStr() + pos, end - pos);
      KJ_IF_SOME(colon, line.findFirst(':')) {
        if (colon == name.size() && strncasecmp(line.cStr(), name.cStr(), colon) == 0) {
          size_t start = colon + 1;
          while (start < line.size() && line[start] == ' ') start++;
          return kj::heapString(line.slice(start));
        }
      }
    }
    pos = end + 2;
  }
  return nullptr;
}

inline kj::String printable(kj::ArrayPtr<const char> bytes, size_t max = 200) {
  kj::Vector<char> out;
  for (size_t i = 0; i < bytes.size() && i < max; i++) {
    char c = bytes[i];
    if (c == '\r') {
      out.addAll(kj::StringPtr("\\r"));
    } else if (c == '\n') {
      out.addAll(kj::StringPtr("\\n"));
    } else if (isprint(static_cast<unsigned char>(c))) {
      out.add(c);
    } else {
      out.add('?');
    }
  }
  if (bytes.size() > max) out.addAll(kj::StringPtr("..."));
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

class Wire {
  // One end of a real socket (a downstream client, or the upstream's end of a connection the
  // proxy opened), read and written by the test. Every read is bounded.
public:
  Wire(LoopEnv& env, kj::Own<kj::AsyncIoStream> stream, kj::StringPtr name)
      : env(env), stream(kj::mv(stream)), name(kj::heapString(name)) {}
  KJ_DISALLOW_COPY(Wire);

  kj::AsyncIoStream& getStream() { return *stream; }

  void send(kj::StringPtr bytes) {
    within(env, writeAll(*stream, bytes.asBytes()), kj::str(name, ": writing"));
  }

  kj::Promise<void> sendLater(kj::String bytes) {
    // For writes larger than the socket buffers: the caller reads the other side meanwhile,
    // then waits for this.
    // (evalNow: kj's socket throws at once when the write fails at once.)
    auto write = kj::evalNow([&]() { return writeAll(*stream, bytes.asBytes()); });
    return write.attach(kj::mv(bytes)).eagerlyEvaluate(nullptr);
  }

  bool fill(kj::StringPtr what) {
    // Reads more; false at the end of the stream (FIN or reset).
    if (eof) return false;
    auto chunk = kj::heapArray<char>(65536);
    auto read = kj::evalNow([&]() { return stream->tryRead(chunk.begin(), 1, chunk.size()); })
        .then([](size_t n) { return n; }, [this](kj::Exception&& e) -> size_t {
      if (e.getType() != kj::Exception::Type::DISCONNECTED) kj::throwFatalException(kj::mv(e));
      sawReset = true;
      return 0;
    });
    size_t n = within(env, kj::mv(read), kj::str(name, ": ", what));
    if (n == 0) {
      eof = true;
      return false;
    }
    buffer.addAll(chunk.begin(), chunk.begin() + n);
    return true;
  }

  size_t available() { return buffer.size() - start; }

  kj::String take(size_t n) {
    KJ_ASSERT(n <= available());
    auto result = kj::heapString(buffer.begin() + start, n);
    start += n;
    if (start == buffer.size()) {
      buffer.clear();
      start = 0;
    } else if (start > 65536 && start > buffer.size() / 2) {
      kj::Vector<char> rest;
      rest.addAll(buffer.begin() + start, buffer.end());
      buffer = kj::mv(rest);
      start = 0;
    }
    return result;
  }

  kj::String takeAll() { return take(available()); }

  kj::Maybe<size_t> find(kj::StringPtr needle) {
    auto size = available();
    const char* base = buffer.begin() + start;
    for (size_t i = 0; i + needle.size() <= size; i++) {
      if (memcmp(base + i, needle.begin(), needle.size()) == 0) return i;
    }
    return nullptr;
  }

  kj::Maybe<kj::String> tryReadThrough(kj::StringPtr delimiter, kj::StringPtr what) {
    // Everything up to and including `delimiter`; null if the stream ends first.
    for (;;) {
      KJ_IF_SOME(i, find(delimiter)) {
        return take(i + delimiter.size());
      }
      if (!fill(what)) return nullptr;
    }
  }

  kj::String readHead(kj::StringPtr what) {
    KJ_IF_SOME(head, tryReadThrough("\r\n\r\n", what)) {
      return kj::mv(head);
    }
    KJ_FAIL_ASSERT("the stream ended before a complete head", name, what, sawReset,
        printable(kj::arrayPtr(buffer.begin() + start, available())));
  }

  struct Body {
    kj::String data;
    bool complete = true;   // ended where its framing said
    kj::String trailers;    // chunked only: the trailer section (without the final CRLF)
  };

  Body readFixed(size_t n, kj::StringPtr what) {
    while (available() < n) {
      if (!fill(what)) return Body{takeAll(), false, nullptr};
    }
    return Body{take(n), true, nullptr};
  }

  Body readChunked(kj::StringPtr what) {
    kj::Vector<char> data;
    for (;;) {
      KJ_IF_SOME(line, tryReadThrough("\r\n", what)) {
        size_t size = strtoul(line.cStr(), nullptr, 16);
        if (size == 0) {
          // Trailers, then the empty line.
          kj::Vector<char> trailers;
          for (;;) {
            KJ_IF_SOME(t, tryReadThrough("\r\n", what)) {
              if (t == "\r\n") break;
              trailers.addAll(t);
            } else {
              return Body{kj::heapString(data.begin(), data.size()), false, nullptr};
            }
          }
          return Body{kj::heapString(data.begin(), data.size()), true,
              kj::heapString(trailers.begin(), trailers.size())};
        }
        auto chunk = readFixed(size + 2, what);
        if (!chunk.complete) {
          data.addAll(chunk.data);
          return Body{kj::heapString(data.begin(), data.size()), false, nullptr};
        }
        KJ_ASSERT(chunk.data.endsWith("\r\n"), "a chunk did not end in CRLF", name);
        data.addAll(chunk.data.begin(), chunk.data.end() - 2);
      } else {
        return Body{kj::heapString(data.begin(), data.size()), false, nullptr};
      }
    }
  }

  Body readToEnd(kj::StringPtr what) {
    while (fill(what)) {}
    return Body{takeAll(), true, nullptr};
  }

  struct Request {
    kj::String head;
    kj::String method;
    kj::String path;
    Body body;
  };

  Request readRequest(kj::StringPtr what = "reading a request") {
    auto head = readHead(what);
    auto method = kj::heapString(head.begin(), KJ_ASSERT_NONNULL(head.findFirst(' ')));
    auto path = test::pathOf(head);
    Body body{kj::str(""), true, nullptr};
    KJ_IF_SOME(te, headerOf(head, "Transfer-Encoding")) {
      KJ_ASSERT(te == "chunked", te);
      body = readChunked(what);
    } else KJ_IF_SOME(length, headerOf(head, "Content-Length")) {
      body = readFixed(length.parseAs<size_t>(), what);
    }
    return Request{kj::mv(head), kj::mv(method), kj::mv(path), kj::mv(body)};
  }

  struct Response {
    unsigned status = 0;
    kj::String head;
    Body body;
  };

  Response readResponse(kj::StringPtr requestMethod = "GET",
      kj::StringPtr what = "reading a response") {
    // One response (an interim 1xx too), its body framed as HTTP/1.1 says.
    auto head = readHead(what);
    KJ_ASSERT(head.startsWith("HTTP/1.") && head.size() > 12, printable(head));
    unsigned status = strtoul(head.cStr() + 9, nullptr, 10);
    Body body{kj::str(""), true, nullptr};
    if (requestMethod == "HEAD" || status / 100 == 1 || status == 204 || status == 304) {
      // no body
    } else KJ_IF_SOME(te, headerOf(head, "Transfer-Encoding")) {
      KJ_ASSERT(te == "chunked", te);
      body = readChunked(what);
    } else KJ_IF_SOME(length, headerOf(head, "Content-Length")) {
      body = readFixed(length.parseAs<size_t>(), what);
    } else {
      body = readToEnd(what);
    }
    return Response{status, kj::mv(head), kj::mv(body)};
  }

  bool endsWithin(kj::StringPtr what) {
    // The other side closes (FIN or reset) within the limit, sending nothing more first. Bytes
    // that arrive instead are kept (see leftover()).
    if (available() > 0) return false;
    if (fill(what)) return false;
    return true;
  }

  bool quietFor(kj::Duration d) {
    // Nothing arrives, and the stream does not end, for `d`.
    if (available() > 0 || eof) return false;
    auto chunk = kj::heapArray<char>(65536);
    auto read = kj::evalNow([&]() { return stream->tryRead(chunk.begin(), 1, chunk.size()); })
        .then([](size_t n) -> kj::Maybe<size_t> { return n; },
              [this](kj::Exception&& e) -> kj::Maybe<size_t> {
      if (e.getType() != kj::Exception::Type::DISCONNECTED) kj::throwFatalException(kj::mv(e));
      sawReset = true;
      return size_t(0);
    });
    auto outcome = read.exclusiveJoin(env.timer.afterDelay(d).then([]() -> kj::Maybe<size_t> {
      return nullptr;
    })).wait(env.ws);
    KJ_IF_SOME(n, outcome) {
      if (n == 0) {
        eof = true;
      } else {
        buffer.addAll(chunk.begin(), chunk.begin() + n);
      }
      return false;
    }
    return true;
  }

  kj::String leftover() { return printable(kj::arrayPtr(buffer.begin() + start, available())); }

  void reset() {
    // Closes with SO_LINGER 0: the kernel sends RST (on TCP), like a client that crashed.
    KJ_IF_SOME(fd, stream->getFd()) {
      struct linger lin = {1, 0};
      KJ_SYSCALL(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof(lin)));
    }
    stream = nullptr;
  }

  void close() { stream = nullptr; }

  void noDelay() {
    // TCP_NODELAY: each small write leaves as its own segment.
    int fd = KJ_ASSERT_NONNULL(stream->getFd());
    int one = 1;
    KJ_SYSCALL(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)));
  }

  kj::Own<kj::AsyncIoStream> release() {
    KJ_ASSERT(available() == 0, "bytes read ahead would be lost", leftover());
    return kj::mv(stream);
  }

  bool sawReset = false;
  bool eof = false;

private:
  LoopEnv& env;
  kj::Own<kj::AsyncIoStream> stream;
  kj::String name;
  kj::Vector<char> buffer;
  size_t start = 0;
};

}  // namespace test
}  // namespace sockfetch
