// A systematic sweep: one exchange is started, the event loop runs exactly k turns
// (kj::EventLoop::run(1) per turn; on a socket a turn with nothing queued polls the kernel
// instead), then one intervention is made, for every k from 0 until the exchange is over by itself
// (0 to MAX_TURNS, and the last turn). Interventions: drop the response promise (and a read in
// flight), drop the response body (at once if it arrived, else as soon as it does), drop the
// request body stream, destroy the StreamFetcher or the ConnectionPool with everything else still
// held, drop everything at once, drop the exchange and at once send a second request, and, for a
// StreamFetcher, release() and a second request() at that moment. Exchanges: GET framed by
// Content-Length, GET chunked with trailers, HEAD, 103 then the final response, POST with
// `Expect: 100-continue`, POST of a known length written by the caller, POST of unknown length
// (chunked) streamed by the caller, a response with `Connection: close`, and a WebSocket
// handshake (101 and a first message). The upstream is scripted and asynchronous on the same
// loop; it writes every response in three pieces, each with a recognisable body.
//
// After each intervention everything settles, everything still held is dropped, and then:
//  - a body read to its end is exactly its own response's body; a refused release() or request()
//    left the exchange in flight untouched (it completes with its exact body);
//  - a refused request wrote nothing (the upstream never sees it);
//  - the upstream never sees a request whose bytes are not exactly what a correct client sends
//    (a partial request followed by another request shows up as such), nor a request before the
//    previous one was answered, nor a POST sent again after its bytes reached it;
//  - if the fetcher (or the connection it released) still offers the connection, a second
//    request gets exactly the second response the upstream sent, else the fetcher is CLOSED with
//    a reason, refuses at once, and the connection was closed; a pool always serves the second
//    request, with every connection it opened open or counted once as dropped;
//  - a destroyed client leaves no connection open once the exchange is over and dropped;
//  - everything is memory-safe in any order (the suite also runs under ASan+UBSan).
// Each sweep runs on a new connection and on one that already served a request (the pool then
// has room for one connection only, so a request made as the exchange goes waits), over an
// in-process pipe, real loopback TCP (127.0.0.1) and loopback TCP under test::tlsLike().
// Each sweep also checks that it reached both ends: runs where the connection was dropped and
// runs where it was kept and reused.

#include <sockfetch/kj-compat.h>
#include <sockfetch/pool.h>
#include <sockfetch/stream-fetcher.h>
#include <sockfetch/test-util.h>

#include <kj/async-unix.h>
#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/test.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::contains;

constexpr unsigned MAX_TURNS = 60;

kj::EventLoop& loopOf(kj::WaitScope& ws) {
  // kj::setupAsyncIo() does not expose its EventLoop, which run(maxTurnCount) needs. In 0.9.2 a
  // WaitScope's first member is its `EventLoop& loop` (async.h); SweepEnv() checks the result.
  static_assert(sizeof(kj::WaitScope) >= sizeof(void*), "WaitScope layout changed");
  kj::EventLoop* loop;
  memcpy(&loop, &ws, sizeof(loop));
  return *loop;
}

// =================================================================================================
// The exchanges

enum class Kind { GET_LENGTH, GET_CHUNKED, HEAD, INTERIM, POST_CONTINUE, POST_FIXED,
    POST_CHUNKED, CONNECTION_CLOSE, WEBSOCKET };

struct Script {
  Kind kind;
  kj::HttpMethod method;
  kj::StringPtr response;   // the upstream's answer to "/first" (not for WEBSOCKET)
  kj::StringPtr expected;   // the body (or first message) the caller must read
  bool fixedBody = false;   // the caller writes FIXED_PIECES with a known length
  bool chunkedBody = false; // the caller streams CHUNKED_PIECES without a length
  bool expectContinue = false;
  bool reusable = true;     // the connection may come back after a complete exchange
};

constexpr kj::StringPtr FIXED_PIECES[] = {"0123456789"_kj, "abcdefghij"_kj};
constexpr kj::StringPtr CHUNKED_PIECES[] = {"aaaa"_kj, "bbbbbb"_kj, "cc"_kj};

const Script SCRIPTS[] = {
  {Kind::GET_LENGTH, kj::HttpMethod::GET,
      "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nFIRST-length", "FIRST-length"},
  {Kind::GET_CHUNKED, kj::HttpMethod::GET,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nFIRST-\r\n7\r\nchunked\r\n"
      "0\r\nX-Trailer: t\r\n\r\n", "FIRST-chunked"},
  {Kind::HEAD, kj::HttpMethod::HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", ""},
  {Kind::INTERIM, kj::HttpMethod::GET,
      "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
      "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nFIRST-interim", "FIRST-interim"},
  {Kind::POST_CONTINUE, kj::HttpMethod::POST,
      "HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nFIRST-continue", "FIRST-continue", true,
      false, true},
  {Kind::POST_FIXED, kj::HttpMethod::POST,
      "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nFIRST-fixed", "FIRST-fixed", true},
  {Kind::POST_CHUNKED, kj::HttpMethod::POST,
      "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nFIRST-chunked", "FIRST-chunked", false, true},
  {Kind::CONNECTION_CLOSE, kj::HttpMethod::GET,
      "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n\r\nFIRST-close",
      "FIRST-close", false, false, false, false},
  {Kind::WEBSOCKET, kj::HttpMethod::GET, "", "FIRST-ws", false, false, false, false},
};

kj::String expectedBody(const Script& s) {
  kj::Vector<char> out;
  if (s.fixedBody) for (auto p: FIXED_PIECES) out.addAll(p);
  if (s.chunkedBody) for (auto p: CHUNKED_PIECES) out.addAll(p);
  return kj::heapString(out.begin(), out.size());
}

// =================================================================================================
// The upstream: serves every connection given to it, on the same event loop, and checks every
// byte it receives against what a correct client sends.

kj::Maybe<kj::String> headerOf(kj::StringPtr head, kj::StringPtr name) {
  auto lower = kj::heapString(head);
  for (auto& c: lower) c = tolower(c);
  auto needle = kj::str("\r\n", name, ":");
  const char* found = strstr(lower.cStr(), needle.cStr());
  if (found == nullptr) return nullptr;
  size_t start = found - lower.cStr() + needle.size();
  while (head[start] == ' ') start++;
  size_t end = start;
  while (head[end] != '\r') end++;
  return kj::heapString(head.slice(start, end));
}

class Upstream {
public:
  explicit Upstream(const Script& script)
      : script(script), body(expectedBody(script)), tasks(errors) {}

  struct Conn {
    unsigned id;
    kj::Own<kj::AsyncIoStream> stream;
    kj::Vector<char> buf;
    kj::Vector<kj::String> paths;  // complete requests, in order
    bool continueSent = false;
    bool firstSeen = false;        // the request line of a POST to /first came on it
    bool upgraded = false;
    bool ended = false;            // the client's side ended, or the upstream closed
    char chunk[4096];
  };

  void add(kj::Own<kj::AsyncIoStream> stream) {
    auto conn = kj::heap<Conn>();
    conn->id = conns.size();
    conn->stream = kj::mv(stream);
    auto& c = *conn;
    conns.add(kj::mv(conn));
    tasks.add(serve(c));
  }

  void listen(kj::AsyncIoContext& io, kj::WaitScope& ws) {
    // Serves every connection made to `address` (its own loopback port).
    auto& network = io.provider->getNetwork();
    listener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
    address = network.parseAddress("127.0.0.1", listener->getPort()).wait(ws);
    tasks.add(acceptLoop());
  }

  kj::Own<kj::NetworkAddress> address;
  kj::Vector<kj::Own<Conn>> conns;
  kj::Vector<kj::String> violations;
  kj::Vector<kj::String> secondBodies;  // the body of each answer to "/second"

  bool allEnded() {
    for (auto& c: conns) if (!c->ended) return false;
    return true;
  }
  unsigned openCount() {
    unsigned n = 0;
    for (auto& c: conns) if (!c->ended) n++;
    return n;
  }

private:
  const Script& script;
  kj::String body;  // the request body "/first" must carry
  struct Errors final: public kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&& e) override {
      KJ_FAIL_EXPECT("the sweep's upstream failed", e);
    }
  } errors;
  kj::Own<kj::ConnectionReceiver> listener;
  kj::TaskSet tasks;  // last: its tasks use everything above

  kj::Promise<void> acceptLoop() {
    return listener->accept().then([this](kj::Own<kj::AsyncIoStream> s) {
      add(kj::mv(s));
      return acceptLoop();
    });
  }

  void violation(Conn& c, kj::StringPtr why) {
    violations.add(kj::str("connection ", c.id, ": ", why, ": ",
        kj::encodeCEscape(kj::arrayPtr(c.buf.begin(), kj::min(c.buf.size(), size_t(120))))));
    c.ended = true;
    c.stream = nullptr;
  }

  kj::Promise<bool> more(Conn& c) {
    return kj::evalNow([&c]() { return c.stream->tryRead(c.chunk, 1, sizeof(c.chunk)); })
        .then([&c](size_t n) {
      c.buf.addAll(c.chunk, c.chunk + n);
      return n > 0;
    }, [](kj::Exception&&) { return false; });
  }

  enum class Parse { MORE, DONE, BAD };

  Parse checkBody(Conn& c, kj::ArrayPtr<const char> got, kj::StringPtr& why) {
    // `got`: body bytes received so far (de-chunked), all of which must match.
    if (got.size() > body.size() ||
        (got.size() > 0 && memcmp(got.begin(), body.begin(), got.size()) != 0)) {
      why = "request body bytes that the caller never wrote (another request inside a body?)";
      return Parse::BAD;
    }
    return Parse::MORE;
  }

  Parse parse(Conn& c, size_t& length, kj::String& head, kj::StringPtr& why) {
    auto text = kj::arrayPtr(c.buf.begin(), c.buf.size());
    size_t headEnd = 0;
    for (size_t i = 0; i + 4 <= text.size(); i++) {
      if (memcmp(text.begin() + i, "\r\n\r\n", 4) == 0) { headEnd = i + 4; break; }
    }
    // Every complete line of a head must be a request line (first) or a header line.
    size_t lineStart = 0;
    for (size_t i = 0; i + 1 < (headEnd ? headEnd - 2 : text.size()); i++) {
      if (text[i] != '\r' || text[i + 1] != '\n') continue;
      auto line = kj::heapString(text.slice(lineStart, i));
      if (lineStart == 0) {
        if (!(line.startsWith("GET /") || line.startsWith("HEAD /") ||
              line.startsWith("POST /")) || !line.endsWith(" HTTP/1.1")) {
          why = "a request line that is not one";
          return Parse::BAD;
        }
        if (line.startsWith("POST /first ") && !c.firstSeen) {
          c.firstSeen = true;
          for (auto& other: conns) {
            if (other.get() != &c && other->firstSeen) {
              why = "a POST sent again after its bytes reached the server";
              return Parse::BAD;
            }
          }
        }
      } else if (strchr(line.cStr(), ':') == nullptr) {
        why = "a header line without a colon (a request inside another's head?)";
        return Parse::BAD;
      }
      lineStart = i + 2;
    }
    if (headEnd == 0) {
      if (text.size() > 16384) { why = "an endless head"; return Parse::BAD; }
      return Parse::MORE;
    }
    head = kj::heapString(text.slice(0, headEnd));
    bool first = head.startsWith(kj::str(script.method, " /first "));
    KJ_IF_SOME(cl, headerOf(head, "content-length")) {
      size_t n = strtoul(cl.cStr(), nullptr, 10);
      if (!first || n != body.size()) { why = "an unexpected Content-Length"; return Parse::BAD; }
      auto got = text.slice(headEnd, kj::min(text.size(), headEnd + n));
      if (checkBody(c, got, why) == Parse::BAD) return Parse::BAD;
      if (got.size() < n) return Parse::MORE;
      length = headEnd + n;
      return Parse::DONE;
    }
    KJ_IF_SOME(te, headerOf(head, "transfer-encoding")) {
      if (!first || te != "chunked" || !script.chunkedBody) {
        why = "an unexpected Transfer-Encoding";
        return Parse::BAD;
      }
      kj::Vector<char> got;
      size_t pos = headEnd;
      for (;;) {
        size_t eol = pos;
        while (eol + 1 < text.size() && !(text[eol] == '\r' && text[eol + 1] == '\n')) {
          if (!isxdigit(text[eol])) {
            why = "a chunk size line that is not one";
            return Parse::BAD;
          }
          eol++;
        }
        if (eol + 1 >= text.size()) return checkBody(c, got, why);
        if (eol == pos) { why = "an empty chunk size line"; return Parse::BAD; }
        size_t size = strtoul(kj::heapString(text.slice(pos, eol)).cStr(), nullptr, 16);
        pos = eol + 2;
        if (size == 0) {
          // (Shorter is fine: kj ends a chunked body when its stream is dropped.)
          if (text.size() < pos + 2) return Parse::MORE;
          if (text[pos] != '\r' || text[pos + 1] != '\n') {
            why = "no CRLF after the last chunk";
            return Parse::BAD;
          }
          length = pos + 2;
          return Parse::DONE;
        }
        auto data = text.slice(pos, kj::min(text.size(), pos + size));
        got.addAll(data);
        if (checkBody(c, got, why) == Parse::BAD) return Parse::BAD;
        if (data.size() < size || text.size() < pos + size + 2) return Parse::MORE;
        if (text[pos + size] != '\r' || text[pos + size + 1] != '\n') {
          why = "no CRLF after a chunk";
          return Parse::BAD;
        }
        pos += size + 2;
      }
    }
    if (first && body.size() > 0) {
      why = "a body-carrying request without its body";
      return Parse::BAD;
    }
    length = headEnd;
    return Parse::DONE;
  }

  kj::Promise<void> serve(Conn& c) {
    if (c.ended) return kj::READY_NOW;
    size_t length = 0;
    kj::String head;
    kj::StringPtr why;
    switch (parse(c, length, head, why)) {
      case Parse::BAD:
        violation(c, why);
        return kj::READY_NOW;
      case Parse::MORE: {
        if (head.size() > 0 && script.expectContinue && !c.continueSent &&
            KJ_ASSERT_NONNULL(headerOf(head, "expect")) == "100-continue") {
          c.continueSent = true;
          return write(c, kj::heapString("HTTP/1.1 100 Continue\r\n\r\n"))
              .then([this, &c]() { return serve(c); });
        }
        return more(c).then([this, &c](bool got) -> kj::Promise<void> {
          if (!got) {
            c.ended = true;  // the client closed (perhaps in the middle of a request: allowed)
            return kj::READY_NOW;
          }
          return serve(c);
        });
      }
      case Parse::DONE:
        break;
    }
    auto rest = kj::heapArray<char>(c.buf.begin() + length, c.buf.size() - length);
    c.buf.clear();
    c.buf.addAll(rest);
    c.continueSent = false;
    c.firstSeen = false;  // (a complete request, which may be sent again on this connection)
    size_t pathEnd = head.findFirst(' ').orDefault(0) + 1;
    while (head[pathEnd] != ' ') pathEnd++;
    auto path = kj::heapString(head.slice(head.findFirst(' ').orDefault(0) + 1, pathEnd));
    c.paths.add(kj::heapString(path));
    if (c.buf.size() > 0) {
      // A client that never pipelines has nothing more to send until this is answered.
      violation(c, "bytes beyond a complete request before its response (pipelining)");
      return kj::READY_NOW;
    }
    kj::String reply;
    bool close = false;
    if (path == "/first") {
      if (script.kind == Kind::WEBSOCKET) {
        auto key = KJ_ASSERT_NONNULL(headerOf(head, "sec-websocket-key"));
        reply = kj::str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Accept: ", test::webSocketAccept(key),
            "\r\n\r\n\x81\x08", script.expected);
        c.upgraded = true;
      } else {
        reply = kj::heapString(script.response);
        close = !script.reusable;
      }
    } else if (path == "/warm") {
      reply = kj::heapString("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nWARM");
    } else if (path == "/second") {
      auto text = kj::str("SECOND c", c.id, " r", c.paths.size() - 1);
      reply = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", text.size(), "\r\n\r\n", text);
      secondBodies.add(kj::mv(text));
    } else {
      violation(c, kj::str("a request for ", path, ", which the client refused to send"));
      return kj::READY_NOW;
    }
    // Written in three pieces, so that the client sees the response arrive over several turns.
    size_t a = reply.size() / 3, b = 2 * reply.size() / 3;
    auto p1 = kj::heapString(reply.slice(0, a));
    auto p2 = kj::heapString(reply.slice(a, b));
    auto p3 = kj::heapString(reply.slice(b));
    return write(c, kj::mv(p1)).then([this, &c, p2 = kj::mv(p2)]() mutable {
      return write(c, kj::mv(p2));
    }).then([this, &c, p3 = kj::mv(p3)]() mutable {
      return write(c, kj::mv(p3));
    }).then([this, &c, close]() -> kj::Promise<void> {
      if (close && !c.ended) {
        c.ended = true;
        c.stream = nullptr;
        return kj::READY_NOW;
      }
      if (c.upgraded) return drain(c);
      return serve(c);
    });
  }

  kj::Promise<void> write(Conn& c, kj::String bytes) {
    if (c.ended || bytes.size() == 0) return kj::READY_NOW;
    auto& b = bytes;
    return kj::evalNow([&]() { return writeAll(*c.stream, b.asBytes()); }).attach(kj::mv(bytes))
        .catch_([&c](kj::Exception&&) {
      c.ended = true;  // the client went away while we answered
    });
  }

  kj::Promise<void> drain(Conn& c) {
    // After a 101 the client speaks WebSocket; whatever it sends is not checked.
    if (c.ended) return kj::READY_NOW;
    c.buf.clear();
    return more(c).then([this, &c](bool got) -> kj::Promise<void> {
      if (!got) {
        c.ended = true;
        return kj::READY_NOW;
      }
      return drain(c);
    });
  }
};

// =================================================================================================
// The caller's side of one exchange: every piece held separately, so that any may be dropped.

struct Exchange {
  const Script& s;
  kj::HttpHeaderTable& table;
  kj::Own<kj::AsyncOutputStream> requestBody;
  kj::Maybe<kj::Promise<void>> writing;
  kj::Maybe<kj::Promise<void>> awaiting;
  kj::Own<kj::AsyncInputStream> body;
  kj::Own<kj::WebSocket> webSocket;
  kj::Maybe<kj::Promise<void>> reading;
  bool dropBodyOnArrival = false;
  bool gotResponse = false;
  bool written = false;
  bool finished = false;  // the body (or first message) was read in full
  uint status = 0;
  kj::String text;
  kj::Maybe<kj::String> error;

  Exchange(const Script& s, kj::HttpHeaderTable& table): s(s), table(table) {}

  void fail(kj::Exception&& e) {
    if (error == nullptr) error = kj::str(e.getDescription());
  }

  void start(kj::HttpClient& client) {
    kj::HttpHeaders h(table);
    h.set(kj::HttpHeaderId::HOST, "upstream.test");
    if (s.expectContinue) h.add("Expect", "100-continue");
    if (s.kind == Kind::WEBSOCKET) {
      awaiting = client.openWebSocket("/first", h).then(
          [this](kj::HttpClient::WebSocketResponse&& r) {
        gotResponse = true;
        status = r.statusCode;
        KJ_SWITCH_ONEOF(r.webSocketOrBody) {
          KJ_CASE_ONEOF(b, kj::Own<kj::AsyncInputStream>) {
            (void)b;
            KJ_FAIL_EXPECT("a WebSocket handshake answered 101 got a body", status);
          }
          KJ_CASE_ONEOF(w, kj::Own<kj::WebSocket>) {
            webSocket = kj::mv(w);
            if (dropBodyOnArrival) {
              webSocket = nullptr;
              return;
            }
            reading = webSocket->receive().then([this](kj::WebSocket::Message&& m) {
              KJ_IF_SOME(t, m.tryGet<kj::String>()) text = kj::mv(t);
              finished = true;
            }).eagerlyEvaluate([this](kj::Exception&& e) { fail(kj::mv(e)); });
          }
        }
      }).eagerlyEvaluate([this](kj::Exception&& e) { fail(kj::mv(e)); });
      return;
    }
    kj::Maybe<uint64_t> size;
    if (s.fixedBody) size = expectedBody(s).size();
    auto request = client.request(s.method, "/first", h, size);
    if (s.fixedBody || s.chunkedBody) {
      requestBody = kj::mv(request.body);
      writing = writeFrom(0).eagerlyEvaluate([this](kj::Exception&& e) { fail(kj::mv(e)); });
    } else {
      request.body = nullptr;
      written = true;
    }
    awaiting = request.response.then([this](kj::HttpClient::Response&& r) {
      gotResponse = true;
      status = r.statusCode;
      body = kj::mv(r.body);
      if (dropBodyOnArrival) {
        body = nullptr;
        return;
      }
      reading = body->readAllText().then([this](kj::String t) {
        text = kj::mv(t);
        finished = true;
      }).eagerlyEvaluate([this](kj::Exception&& e) { fail(kj::mv(e)); });
    }).eagerlyEvaluate([this](kj::Exception&& e) { fail(kj::mv(e)); });
  }

  kj::Promise<void> writeFrom(size_t i) {
    auto pieces = s.fixedBody ? kj::arrayPtr(FIXED_PIECES, kj::size(FIXED_PIECES))
                              : kj::arrayPtr(CHUNKED_PIECES, kj::size(CHUNKED_PIECES));
    if (i == pieces.size()) {
      requestBody = nullptr;
      written = true;
      return kj::READY_NOW;
    }
    return requestBody->write(pieces[i].begin(), pieces[i].size()).then([this, i]() {
      return writeFrom(i + 1);
    });
  }

  void dropAll() {
    writing = nullptr;
    requestBody = nullptr;
    awaiting = nullptr;
    reading = nullptr;
    body = nullptr;
    webSocket = nullptr;
  }
};

// =================================================================================================
// One run: an upstream, a client (a StreamFetcher or a ConnectionPool) on pipes or loopback TCP,
// one exchange, k turns, one intervention, the checks.

enum class Client { FETCHER, POOL };
enum class Act { NOTHING, CANCEL_RESPONSE, DROP_BODY, DROP_REQUEST_BODY, DESTROY_CLIENT,
    DROP_EVERYTHING, RELEASE, SECOND_REQUEST, ABANDON_AND_REQUEST };

kj::StringPtr KJ_STRINGIFY(Act a) {
  switch (a) {
    case Act::NOTHING: return "nothing";
    case Act::CANCEL_RESPONSE: return "drop the response promise";
    case Act::DROP_BODY: return "drop the response body";
    case Act::DROP_REQUEST_BODY: return "drop the request body";
    case Act::DESTROY_CLIENT: return "destroy the client";
    case Act::DROP_EVERYTHING: return "drop everything";
    case Act::RELEASE: return "release()";
    case Act::SECOND_REQUEST: return "a second request()";
    case Act::ABANDON_AND_REQUEST: return "drop the exchange, then at once a second request()";
  }
  KJ_UNREACHABLE;
}

struct SweepEnv: public test::LoopEnv {
  kj::EventLoop& loop = loopOf(ws);
  bool tcp;
  bool tls;           // TCP under test::tlsLike(): a stream with a descriptor that reads ahead
  bool warm = false;  // each run's exchange goes on a connection that already served one
  unsigned maxConnections = 1;  // the pool's; with 1, a request made as the exchange goes waits
  // What the runs of one sweep came to, so that a sweep proves it reached each outcome.
  unsigned secondOnSameConnection = 0;  // the fetcher (or its released stream) carried a second
  unsigned closedAndRefused = 0;        // the fetcher was CLOSED and refused the second request
  unsigned releasedIdle = 0;            // release() gave the connection back
  unsigned refusedWhileBusy = 0;        // release() or request() refused, exchange untouched
  unsigned poolDropped = 0;             // the pool dropped a connection (counted under a reason)
  unsigned poolReused = 0;              // the pool sent the second request on a kept connection

  SweepEnv(bool tcp, bool tls): tcp(tcp), tls(tls) {
    ws.poll();
    KJ_ASSERT(!loop.isRunnable());
    auto probe = kj::evalLater([]() {}).eagerlyEvaluate(nullptr);
    KJ_ASSERT(loop.isRunnable(), "loopOf() did not find the WaitScope's loop");
    loop.run(1);
    KJ_ASSERT(probe.poll(ws));
  }

  kj::Promise<kj::Own<kj::AsyncIoStream>> connect(Upstream& upstream) {
    // A new connection, whose far end the upstream serves (over TCP: once accepted).
    if (!tcp) {
      auto pipe = kj::newTwoWayPipe();
      upstream.add(kj::mv(pipe.ends[1]));
      return kj::mv(pipe.ends[0]);
    }
    auto connected = upstream.address->connect();
    if (!tls) return connected;
    return connected.then([](kj::Own<kj::AsyncIoStream> s) { return test::tlsLike(kj::mv(s)); });
  }

  bool step() {
    // One turn: one queued event, or (nothing queued) a look at the kernel for I/O. False when
    // there was nothing to do at all.
    if (loop.isRunnable()) {
      loop.run(1);
      return true;
    }
    io.unixEventPort.poll();
    return loop.isRunnable();
  }

  void quiesce() {
    // Runs until nothing is queued and the kernel has nothing for us.
    for (unsigned i = 0; i < 100000 && step();) i++;
    ws.poll();
  }
};

struct Run {
  SweepEnv& env;
  const Script& s;
  Client kind;
  Upstream upstream;
  kj::Own<StreamFetcher> fetcher;
  kj::Own<ConnectionPool> pool;
  kj::Own<kj::AsyncIoStream> released;
  kj::Maybe<kj::Promise<kj::String>> immediate;  // ABANDON_AND_REQUEST's request
  unsigned secondsSent = 0;
  Exchange exchange;
  bool refused = false;

  Run(SweepEnv& env, const Script& s, Client kind)
      : env(env), s(s), kind(kind), upstream(s), exchange(s, env.table) {
    if (env.tcp) upstream.listen(env.io, env.ws);
    if (kind == Client::FETCHER) {
      auto stream = env.bounded(env.connect(upstream));
      for (unsigned i = 0; i < 1000 && upstream.conns.size() == 0; i++) {
        env.ws.poll();  // the accept (loopback: at once, almost always)
        if (upstream.conns.size() == 0) env.timer.afterDelay(1 * kj::MILLISECONDS).wait(env.ws);
      }
      KJ_ASSERT(upstream.conns.size() == 1);
      StreamFetcher::Settings settings;
      settings.timer = env.timer;
      fetcher = kj::heap<StreamFetcher>(kj::mv(stream), env.table, settings);
    } else {
      ConnectionPool::Settings settings;
      settings.maxConnections = env.maxConnections;
      settings.maxIdleConnections = env.maxConnections;
      settings.idleTimeout = 1000 * kj::SECONDS;
      settings.waitTimeout = 1000 * kj::SECONDS;
      settings.connectTimeout = 1000 * kj::SECONDS;
      pool = kj::heap<ConnectionPool>(env.timer, env.table, [this]() {
        return this->env.connect(upstream);
      }, settings);
    }
    if (env.warm) {
      KJ_ASSERT(second(client(), "/warm") == "WARM");
      KJ_ASSERT(upstream.conns.size() == 1);
    }
    env.quiesce();
  }

  ~Run() noexcept(false) {
    immediate = nullptr;
    exchange.dropAll();
    released = nullptr;
    fetcher = nullptr;
    pool = nullptr;
    env.quiesce();
  }

  kj::StringPtr errorOf() {
    KJ_IF_SOME(e, exchange.error) return e;
    return "(no error)";
  }

  kj::StringPtr why() {
    KJ_IF_SOME(r, fetcher->getCloseReason()) return r;
    return "(not closed)";
  }

  kj::HttpClient& client() {
    if (fetcher.get() != nullptr) return *fetcher;
    return *pool;
  }

  void act(Act a) {
    switch (a) {
      case Act::NOTHING:
        break;
      case Act::CANCEL_RESPONSE:
        exchange.awaiting = nullptr;
        exchange.reading = nullptr;
        break;
      case Act::DROP_BODY:
        if (exchange.gotResponse) {
          exchange.reading = nullptr;
          exchange.body = nullptr;
          exchange.webSocket = nullptr;
        } else {
          exchange.dropBodyOnArrival = true;
        }
        break;
      case Act::DROP_REQUEST_BODY:
        exchange.writing = nullptr;
        exchange.requestBody = nullptr;
        break;
      case Act::DESTROY_CLIENT:
        fetcher = nullptr;
        pool = nullptr;
        break;
      case Act::DROP_EVERYTHING:
        exchange.dropAll();
        fetcher = nullptr;
        pool = nullptr;
        break;
      case Act::ABANDON_AND_REQUEST: {
        // In the same turn: whatever the fetcher or pool does with the abandoned connection must
        // not put this request on it unless it is clean.
        exchange.dropAll();
        kj::HttpHeaders h(env.table);
        h.set(kj::HttpHeaderId::HOST, "upstream.test");
        KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
          auto request = client().request(kj::HttpMethod::GET, "/second", h);
          request.body = nullptr;
          immediate = request.response.then([](kj::HttpClient::Response&& r) {
            return r.body->readAllText().attach(kj::mv(r.body));
          }, [](kj::Exception&& e) {
            return kj::str("failed: ", e.getDescription());
          }).eagerlyEvaluate(nullptr);
        })) {
          KJ_EXPECT(kind == Client::FETCHER, "the pool refused a request at once", e);
          KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED ||
              contains(e.getDescription(), "one request at a time"), e);
        }
        break;
      }
      case Act::RELEASE: {
        auto state = fetcher->getState();
        KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { released = fetcher->release(); })) {
          KJ_EXPECT(state != StreamFetcher::State::IDLE, "release() refused while IDLE", e);
          KJ_EXPECT(contains(e.getDescription(), "release()"), e);
          refused = true;
          if (state == StreamFetcher::State::BUSY) ++env.refusedWhileBusy;
        } else {
          KJ_EXPECT(state == StreamFetcher::State::IDLE, state);
          ++env.releasedIdle;
        }
        break;
      }
      case Act::SECOND_REQUEST: {
        auto state = fetcher->getState();
        if (state == StreamFetcher::State::IDLE) break;  // a plain second request: done below
        kj::HttpHeaders h(env.table);
        h.set(kj::HttpHeaderId::HOST, "upstream.test");
        KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
          auto r = fetcher->request(kj::HttpMethod::GET, "/refused", h);
        })) {
          if (state == StreamFetcher::State::BUSY) {
            KJ_EXPECT(contains(e.getDescription(), "one request at a time"), e);
            ++env.refusedWhileBusy;
          } else {
            KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
          }
          refused = true;
        } else {
          KJ_FAIL_EXPECT("a request() while not IDLE was accepted", state);
        }
        break;
      }
    }
  }

  kj::String second(kj::HttpClient& c, kj::StringPtr path = "/second") {
    kj::HttpHeaders h(env.table);
    h.set(kj::HttpHeaderId::HOST, "upstream.test");
    auto request = c.request(kj::HttpMethod::GET, path, h);
    request.body = nullptr;
    return env.bounded(request.response.then([](kj::HttpClient::Response&& r) {
      return r.body->readAllText().attach(kj::mv(r.body));
    }, [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
  }

  void expectSecondAnswered(kj::StringPtr text) {
    ++secondsSent;
    KJ_EXPECT(upstream.secondBodies.size() == secondsSent, upstream.secondBodies.size(), text);
    if (upstream.secondBodies.size() == secondsSent) {
      KJ_EXPECT(text == upstream.secondBodies.back(),
          "the second response is not the second answer", text, upstream.secondBodies.back());
    }
  }

  void check(Act a) {
    // 1. While everything the intervention left is still held.
    env.quiesce();
    if (exchange.finished) {
      KJ_EXPECT(exchange.text == s.expected, "a body read in full is not its own", exchange.text);
    }
    if (a == Act::NOTHING && fetcher.get() != nullptr) {
      auto expected = s.kind == Kind::WEBSOCKET ? StreamFetcher::CloseKind::UPGRADED
          : s.kind == Kind::CONNECTION_CLOSE ? StreamFetcher::CloseKind::CONNECTION_CLOSE
          : StreamFetcher::CloseKind::NONE;
      KJ_EXPECT(fetcher->getCloseKind() == expected, fetcher->getCloseKind(), why());
    }
    if (a == Act::NOTHING || refused) {
      KJ_EXPECT(exchange.finished, "the exchange did not complete untouched", errorOf(),
          exchange.status);
      KJ_EXPECT(exchange.error == nullptr, errorOf());
    }
    KJ_IF_SOME(p, immediate) {
      // A request made while the first exchange was being abandoned: answered with exactly its
      // own response (a fetcher may have refused it at once, above).
      auto text = env.bounded(kj::mv(p));
      immediate = nullptr;
      expectSecondAnswered(text);
    }
    // 2. Everything dropped.
    bool destroyed = a == Act::DESTROY_CLIENT || a == Act::DROP_EVERYTHING;
    exchange.dropAll();
    env.quiesce();
    KJ_EXPECT(upstream.violations.empty(), kj::strArray(upstream.violations, "\n"));
    if (destroyed) {
      if (!upstream.allEnded()) env.settle(50 * kj::MILLISECONDS);  // (not a matter of time)
      KJ_EXPECT(upstream.allEnded(), "a connection outlived its client and every exchange",
          upstream.openCount(), exchange.finished, errorOf());
      return;
    }
    if (kind == Client::POOL) {
      auto& st = pool->getStats();
      KJ_EXPECT(pool->getIdleCount() == pool->getOpenCount(), pool->getIdleCount(),
          pool->getOpenCount());
      KJ_EXPECT(pool->getOpenCount() == upstream.openCount(), pool->getOpenCount(),
          upstream.openCount());
      KJ_EXPECT(st.connectionsOpened == pool->getOpenCount() + st.dropped(),
          st.connectionsOpened, pool->getOpenCount(), st.dropped());
      if (st.dropped() > 0) ++env.poolDropped;
      auto before = upstream.conns.size();
      expectSecondAnswered(second(*pool));
      if (upstream.conns.size() == before) ++env.poolReused;
    } else if (released.get() != nullptr) {
      StreamFetcher::Settings settings;
      settings.timer = env.timer;
      auto again = kj::heap<StreamFetcher>(kj::mv(released), env.table, settings);
      expectSecondAnswered(second(*again));
      KJ_EXPECT(upstream.conns.size() == 1);
      ++env.secondOnSameConnection;
    } else {
      switch (fetcher->getState()) {
        case StreamFetcher::State::IDLE:
          KJ_EXPECT(upstream.openCount() == 1);
          expectSecondAnswered(second(*fetcher));
          ++env.secondOnSameConnection;
          break;
        case StreamFetcher::State::CLOSED: {
          KJ_EXPECT(KJ_ASSERT_NONNULL(fetcher->getCloseReason()).size() > 0);
          KJ_EXPECT(upstream.allEnded(), "a CLOSED fetcher's connection is still open", why());
          kj::HttpHeaders h(env.table);
          KJ_EXPECT_THROW(DISCONNECTED, fetcher->request(kj::HttpMethod::GET, "/second", h));
          env.quiesce();
          KJ_EXPECT(upstream.secondBodies.empty());
          ++env.closedAndRefused;
          break;
        }
        case StreamFetcher::State::BUSY:
          KJ_FAIL_EXPECT("BUSY with every exchange dropped");
          break;
        case StreamFetcher::State::RELEASED:
          KJ_FAIL_EXPECT("RELEASED, but release() returned nothing");
          break;
      }
    }
    env.quiesce();
    KJ_EXPECT(upstream.violations.empty(), kj::strArray(upstream.violations, "\n"));
  }
};

bool applies(const Script& s, Client c, Act a) {
  if (a == Act::DROP_REQUEST_BODY) return s.fixedBody || s.chunkedBody;
  if (a == Act::RELEASE || a == Act::SECOND_REQUEST) return c == Client::FETCHER;
  return true;
}

void sweep(SweepEnv& env, Kind kind, Client client, kj::ArrayPtr<const Act> acts) {
  const Script& s = SCRIPTS[static_cast<unsigned>(kind)];
  KJ_ASSERT(s.kind == kind);
  // The baseline: how many turns the exchange takes by itself.
  unsigned total = 0;
  {
    Run run(env, s, client);
    run.exchange.start(run.client());
    while (total < 100000 && env.step()) total++;
    run.check(Act::NOTHING);
  }
  KJ_ASSERT(total > 3, total);
  kj::Vector<unsigned> turns;  // 0 to MAX_TURNS, and the turn the exchange was over by itself
  for (unsigned k = 0; k <= kj::min(total, MAX_TURNS); k++) turns.add(k);
  if (total > MAX_TURNS) turns.add(total);
  env.secondOnSameConnection = env.closedAndRefused = env.releasedIdle = env.refusedWhileBusy = 0;
  env.poolDropped = env.poolReused = 0;
  for (auto a: acts) {
    if (!applies(s, client, a)) continue;
    for (unsigned k: turns) {
      KJ_CONTEXT(a, k, total);
      Run run(env, s, client);
      run.exchange.start(run.client());
      for (unsigned i = 0; i < k; i++) env.step();
      run.act(a);
      run.check(a);
    }
  }
  if (client == Client::FETCHER) {
    // Each sweep met both ends: early turns (the connection dropped, the second request refused)
    // and late ones (the connection kept, the second request answered on it), unless the
    // exchange never leaves the connection reusable.
    KJ_EXPECT(env.closedAndRefused > 0);
    KJ_EXPECT(env.refusedWhileBusy > 0);
    if (s.reusable) {
      KJ_EXPECT(env.secondOnSameConnection > 0);
      KJ_EXPECT(env.releasedIdle > 0);
    }
  } else if (acts.size() > 1) {
    KJ_EXPECT(env.poolDropped > 0);
    if (s.reusable) KJ_EXPECT(env.poolReused > 0);
  }
}

constexpr Act FETCHER_ACTS[] = {Act::CANCEL_RESPONSE, Act::DROP_BODY, Act::DROP_REQUEST_BODY,
    Act::DESTROY_CLIENT, Act::DROP_EVERYTHING, Act::RELEASE, Act::SECOND_REQUEST,
    Act::ABANDON_AND_REQUEST};
constexpr Act POOL_ACTS[] = {Act::CANCEL_RESPONSE, Act::DROP_BODY, Act::DROP_REQUEST_BODY,
    Act::DROP_EVERYTHING, Act::ABANDON_AND_REQUEST};
// The pool destroyed at every turn: in the cases at the end.
constexpr Act FETCHER_WARM_ACTS[] = {Act::CANCEL_RESPONSE, Act::DROP_BODY,
    Act::DROP_REQUEST_BODY, Act::DESTROY_CLIENT, Act::DROP_EVERYTHING, Act::RELEASE,
    Act::SECOND_REQUEST, Act::ABANDON_AND_REQUEST};
constexpr Act POOL_WARM_ACTS[] = {Act::CANCEL_RESPONSE, Act::DROP_BODY,
    Act::DROP_REQUEST_BODY, Act::DROP_EVERYTHING, Act::ABANDON_AND_REQUEST};

#define SWEEP_CASE(kind, client, tcp, tls, reused, suffix, label) \
  class Sweep##kind##client##suffix: public ::kj::TestCase { \
  public: \
    Sweep##kind##client##suffix() \
        : ::kj::TestCase(__FILE__, __LINE__, \
              "cancellation sweep: " #kind ", " #client ", " label) {} \
    void run() override { \
      SweepEnv env(tcp, tls); \
      env.warm = reused; \
      env.maxConnections = reused ? 1 : 2; \
      sweep(env, Kind::kind, Client::client, \
          reused ? kj::arrayPtr(client##_WARM_ACTS, kj::size(client##_WARM_ACTS)) \
               : kj::arrayPtr(client##_ACTS, kj::size(client##_ACTS))); \
    } \
  } sweep##kind##client##suffix##Instance;

#define SWEEP_BOTH(kind, client) \
  SWEEP_CASE(kind, client, false, false, false, Pipe, "new connection, in-process pipe") \
  SWEEP_CASE(kind, client, true, false, false, Tcp, "new connection, loopback TCP") \
  SWEEP_CASE(kind, client, true, true, false, Tls, "new connection, TLS-like over TCP") \
  SWEEP_CASE(kind, client, false, false, true, WarmPipe, "reused connection, in-process pipe") \
  SWEEP_CASE(kind, client, true, false, true, WarmTcp, "reused connection, loopback TCP") \
  SWEEP_CASE(kind, client, true, true, true, WarmTls, "reused connection, TLS-like over TCP")
// One sweep of exchange `kind` through `client`, as six KJ tests: on a new or a reused
// connection, over a pipe, loopback TCP, or loopback TCP under the TLS-like wrapper.

SWEEP_BOTH(GET_LENGTH, FETCHER)
SWEEP_BOTH(GET_LENGTH, POOL)
SWEEP_BOTH(GET_CHUNKED, FETCHER)
SWEEP_BOTH(GET_CHUNKED, POOL)
SWEEP_BOTH(HEAD, FETCHER)
SWEEP_BOTH(HEAD, POOL)
SWEEP_BOTH(INTERIM, FETCHER)
SWEEP_BOTH(INTERIM, POOL)
SWEEP_BOTH(POST_CONTINUE, FETCHER)
SWEEP_BOTH(POST_CONTINUE, POOL)
SWEEP_BOTH(POST_FIXED, FETCHER)
SWEEP_BOTH(POST_FIXED, POOL)
SWEEP_BOTH(POST_CHUNKED, FETCHER)
SWEEP_BOTH(POST_CHUNKED, POOL)
SWEEP_BOTH(CONNECTION_CLOSE, FETCHER)
SWEEP_BOTH(CONNECTION_CLOSE, POOL)
SWEEP_BOTH(WEBSOCKET, FETCHER)
SWEEP_BOTH(WEBSOCKET, POOL)

// =================================================================================================
// The pool destroyed at every turn.
//
// Contract (pool.h, "Lifetimes"): destroying the pool fails requests not yet sent and lets those
// sent finish, after which their connections close. At every k, once the exchange is over and
// everything is dropped, the upstream sees every connection closed: also when the pool goes in
// the turn between a connection reaching a request's chain and the request being sent on it (the
// request then fails, and the connection, no longer the pool's, closes unused).

void destroyPoolAtEveryTurn(SweepEnv& env) {
  constexpr Act acts[] = {Act::DESTROY_CLIENT};
  for (bool reused: {false, true}) {
    env.warm = reused;
    for (auto& script: SCRIPTS) {
      KJ_CONTEXT(reused, script.expected);
      sweep(env, script.kind, Client::POOL, acts);
    }
  }
}

KJ_TEST("ConnectionPool destroyed at every turn of every exchange: every connection closes, "
    "also one handed to a request in the turn the pool goes (in-process pipe)") {
  SweepEnv env(false, false);
  destroyPoolAtEveryTurn(env);
}

KJ_TEST("ConnectionPool destroyed at every turn of every exchange: every connection closes, "
    "also one handed to a request in the turn the pool goes (loopback TCP)") {
  SweepEnv env(true, false);
  destroyPoolAtEveryTurn(env);
}

}  // namespace
}  // namespace sockfetch
