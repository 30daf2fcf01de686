#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>

namespace sockfetch {
namespace {

using test::Peer;

struct Env {
  // One event loop, one connection (pipe or loopback TCP), a fetcher on the client end and a
  // scripted peer on the other. Members in dependency order.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::WaitScope& ws = io.waitScope;
  kj::HttpHeaderTable table;
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Peer> peer;

  bool tcp;

  explicit Env(bool tcp, bool tlsLike = false): tcp(tcp) {
    auto transport = tcp ? test::tcpTransport(io) : test::pipeTransport();
    if (tlsLike) transport.client = test::tlsLike(kj::mv(transport.client));
    StreamFetcher::Settings settings;
    settings.timer = io.provider->getTimer();
    fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), table, kj::mv(settings));
    peer = kj::heap<Peer>(ws, kj::mv(transport.server));
  }

  kj::HttpHeaders headers() {
    kj::HttpHeaders h(table);
    h.set(kj::HttpHeaderId::HOST, "test.local");
    return h;
  }

  kj::HttpClient::Request get(kj::StringPtr url = "/") {
    return fetcher->request(kj::HttpMethod::GET, url, headers());
  }

  void getAndWait() {
    // A GET whose failure may come from request() itself or from its response promise.
    auto request = get();
    request.body = nullptr;
    request.response.wait(ws);
  }

  struct Result {
    unsigned status;
    kj::String body;
    kj::String request;  // what the peer received
  };

  Result exchange(kj::HttpMethod method, kj::StringPtr url, kj::StringPtr response,
      kj::Maybe<kj::StringPtr> requestBody = nullptr) {
    // One full exchange: request (with an optional fixed-length body), scripted response, body
    // read to its end.
    auto h = headers();
    kj::Maybe<uint64_t> size;
    KJ_IF_SOME(b, requestBody) size = b.size();
    auto req = fetcher->request(method, url, h, size);
    KJ_IF_SOME(b, requestBody) {
      auto write = writeAll(*req.body, b.asBytes());
      auto request = peer->readRequest();
      write.wait(ws);
      req.body = nullptr;
      return finish(kj::mv(req.response), kj::mv(request), response);
    }
    req.body = nullptr;
    auto request = peer->readRequest();
    return finish(kj::mv(req.response), kj::mv(request), response);
  }

  Result finish(kj::Promise<kj::HttpClient::Response> promise, kj::String request,
      kj::StringPtr response) {
    auto written = peer->sendLater(response);
    auto r = promise.wait(ws);
    auto body = r.body->readAllText().wait(ws);
    written.wait(ws);
    return Result{r.statusCode, kj::mv(body), kj::mv(request)};
  }

  void waitForState(StreamFetcher::State expected) {
    // Lets the event loop run (timers included) until the fetcher reaches `expected`, for at
    // most two seconds.
    auto& timer = io.provider->getTimer();
    auto deadline = timer.now() + 2 * kj::SECONDS;
    while (fetcher->getState() != expected && timer.now() < deadline) {
      timer.afterDelay(1 * kj::MILLISECONDS).wait(ws);
    }
  }

  template <typename T>
  T waitAtMost(kj::Promise<T> promise, kj::Duration limit = 2 * kj::SECONDS) {
    // Waits for `promise`, failing the test instead of hanging if it takes longer than `limit`.
    auto& timer = io.provider->getTimer();
    return promise.exclusiveJoin(timer.afterDelay(limit).then([]() -> T {
      KJ_FAIL_ASSERT("timed out");
    })).wait(ws);
  }

  kj::StringPtr anyReason() {
    KJ_IF_SOME(reason, fetcher->getCloseReason()) return reason;
    return "(not closed)";
  }

  kj::StringPtr closeReason() {
    return KJ_ASSERT_NONNULL(fetcher->getCloseReason());
  }
};

#define TRANSPORT_PAIR(name, description, tlsLike, pipeLabel, tcpLabel) \
  SOCKFETCH_TRANSPORT_PAIR(Env, name, description, pipeLabel, (false, tlsLike), tcpLabel, \
      (true, tlsLike))

#define BOTH_TRANSPORTS(name, description) \
  TRANSPORT_PAIR(name, description, false, "pipe", "tcp")
// Defines one behaviour as two KJ tests: over an in-process pipe and over loopback TCP.

#define TLS_LIKE_TRANSPORTS(name, description) \
  TRANSPORT_PAIR(name, description, true, "tls-like over pipe", "tls-like over tcp")
// The same over a test::tlsLike() wrapper: reads that finish events late, read-ahead, and a
// descriptor that does not show what the wrapper holds.

constexpr kj::StringPtr OK_HELLO = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj;

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

// =================================================================================================
// The basics

BOTH_TRANSPORTS(oneRequest, "StreamFetcher performs one GET") {
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  auto r = env.exchange(kj::HttpMethod::GET, "/hello", OK_HELLO);
  KJ_EXPECT(r.status == 200);
  KJ_EXPECT(r.body == "hello", env.anyReason());
  KJ_EXPECT(r.request.startsWith("GET /hello HTTP/1.1\r\n"), r.request);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 1);
}

BOTH_TRANSPORTS(json, "StreamFetcher returns a JSON response with its headers") {
  auto req = env.get("/api");
  req.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater(
      "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
      "{\"ok\":true,\"n\":1}");
  auto r = req.response.wait(env.ws);
  KJ_EXPECT(r.statusCode == 200);
  KJ_EXPECT(r.statusText == "OK");
  KJ_EXPECT(KJ_ASSERT_NONNULL(r.headers->get(kj::HttpHeaderId::CONTENT_TYPE)) ==
      "application/json");
  KJ_EXPECT(r.body->readAllText().wait(env.ws) == "{\"ok\":true,\"n\":1}");
  written.wait(env.ws);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
}

BOTH_TRANSPORTS(postContentLength, "StreamFetcher POSTs a Content-Length body and reuses") {
  for (int i = 0; i < 3; i++) {
    auto r = env.exchange(kj::HttpMethod::POST, "/echo",
        "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nechoed!", "payload"_kj);
    KJ_EXPECT(r.request.startsWith("POST /echo HTTP/1.1\r\n"));
    KJ_EXPECT(contains(r.request, "Content-Length: 7"), r.request);
    KJ_EXPECT(r.request.endsWith("\r\n\r\npayload"), r.request);
    KJ_EXPECT(r.body == "echoed!");
  }
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 3);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
}

BOTH_TRANSPORTS(postChunked, "StreamFetcher POSTs a chunked body, gets a chunked echo, reuses") {
  for (int i = 0; i < 3; i++) {
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/echo", env.headers());
    auto w1 = writeAll(*req.body, "abc"_kj.asBytes());
    auto head = env.peer->readHead();
    KJ_EXPECT(contains(head, "Transfer-Encoding: chunked"), head);
    KJ_EXPECT(env.peer->readExactly(8) == "3\r\nabc\r\n");
    w1.wait(env.ws);
    auto w2 = writeAll(*req.body, "defg"_kj.asBytes());
    KJ_EXPECT(env.peer->readExactly(9) == "4\r\ndefg\r\n");
    w2.wait(env.ws);
    req.body = nullptr;  // finishes the body: kj writes the last chunk
    KJ_EXPECT(env.peer->readExactly(5) == "0\r\n\r\n");
    auto written = env.peer->sendLater("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n");
    auto r = req.response.wait(env.ws);
    KJ_EXPECT(r.body->readAllText().wait(env.ws) == "abcdefg");
    written.wait(env.ws);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  }
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 3);
}

BOTH_TRANSPORTS(customHeaders, "StreamFetcher sends custom request headers, reads custom ones") {
  auto h = env.headers();
  h.add("X-Request-Id", "abc-123");
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", h);
  req.body = nullptr;
  auto head = env.peer->readRequest();
  KJ_EXPECT(contains(head, "X-Request-Id: abc-123\r\n"), head);
  auto written = env.peer->sendLater(
      "HTTP/1.1 200 OK\r\nX-Upstream: yes\r\nX-Multi: a\r\nContent-Length: 0\r\n\r\n");
  auto r = req.response.wait(env.ws);
  bool sawUpstream = false;
  r.headers->forEach([&](kj::StringPtr name, kj::StringPtr value) {
    if (name == "X-Upstream" && value == "yes") sawUpstream = true;
  });
  KJ_EXPECT(sawUpstream);
  written.wait(env.ws);
}

BOTH_TRANSPORTS(headersOutliveReuse,
    "StreamFetcher keeps a response's headers valid until its body is dropped, across reuse") {
  auto req = env.get("/first");
  req.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater(
      "HTTP/1.1 200 Fine\r\nX-First: one\r\nContent-Length: 5\r\n\r\nhello");
  auto first = req.response.wait(env.ws);
  KJ_EXPECT(first.body->readAllText().wait(env.ws) == "hello");
  written.wait(env.ws);
  // The connection moves on to the next exchange while `first` is still held.
  for (int i = 0; i < 3; i++) {
    auto r = env.exchange(kj::HttpMethod::GET, "/next",
        "HTTP/1.1 200 OK\r\nX-First: overwritten?\r\nContent-Length: 5\r\n\r\nworld");
    KJ_EXPECT(r.body == "world");
  }
  kj::String value;
  first.headers->forEach([&](kj::StringPtr name, kj::StringPtr v) {
    if (name == "X-First") value = kj::heapString(v);
  });
  KJ_EXPECT(value == "one", value);
  KJ_EXPECT(first.statusText == "Fine");
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 4);
}

BOTH_TRANSPORTS(errorStatuses,
    "StreamFetcher passes 404 and 500 through and keeps the connection") {
  auto r1 = env.exchange(kj::HttpMethod::GET, "/missing",
      "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found");
  KJ_EXPECT(r1.status == 404);
  KJ_EXPECT(r1.body == "not found");
  auto r2 = env.exchange(kj::HttpMethod::GET, "/boom",
      "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom");
  KJ_EXPECT(r2.status == 500);
  KJ_EXPECT(r2.body == "boom");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 2);
}

BOTH_TRANSPORTS(manySequential, "StreamFetcher serves 300 sequential requests on one connection") {
  // The peer is the only end of the one connection: every request it reads came through it.
  for (int i = 0; i < 300; i++) {
    auto body = kj::str("response ", i);
    auto r = env.exchange(kj::HttpMethod::GET, kj::str("/n/", i),
        kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", body.size(), "\r\n\r\n", body));
    KJ_ASSERT(r.request.startsWith(kj::str("GET /n/", i, " HTTP/1.1\r\n")), r.request);
    KJ_ASSERT(r.body == body);
  }
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 300);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
}

// =================================================================================================
// One request at a time

BOTH_TRANSPORTS(reuseAfterIdleWatch,
    "StreamFetcher reuses a connection whose idle read had started (the event loop went idle)") {
  auto& timer = env.io.provider->getTimer();
  for (int i = 0; i < 10; i++) {
    // Idle long enough for the idle read to be outstanding: the next exchange takes it over.
    timer.afterDelay(2 * kj::MILLISECONDS).wait(env.ws);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
    auto r = env.exchange(kj::HttpMethod::GET, kj::str("/", i), OK_HELLO);
    KJ_EXPECT(r.body == "hello");
  }
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
}

BOTH_TRANSPORTS(bodylessBodyOutlives,
    "StreamFetcher: a GET's (empty) body stream may outlive its exchange and the fetcher") {
  auto request = env.get();
  env.peer->readRequest();
  auto written = env.peer->sendLater(OK_HELLO);
  auto response = request.response.wait(env.ws);
  KJ_EXPECT(response.body->readAllText().wait(env.ws) == "hello");
  written.wait(env.ws);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  env.fetcher = nullptr;
  KJ_EXPECT_THROW_MESSAGE("this request was made without a body",
      request.body->write("x", 1).wait(env.ws));
  request.body = nullptr;
}

BOTH_TRANSPORTS(concurrentRefused, "StreamFetcher refuses a concurrent request, writing nothing") {
  auto first = env.get("/first");
  first.body = nullptr;
  auto head = env.peer->readRequest();
  KJ_EXPECT(head.startsWith("GET /first "));

  KJ_EXPECT_THROW_MESSAGE("one request at a time", env.get("/second"));
  KJ_EXPECT_THROW_MESSAGE("ConnectionPool", env.get("/second"));
  KJ_EXPECT(env.peer->readWouldBlock(), "a refused request wrote to the wire");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::BUSY);

  // The first exchange is untouched.
  auto r = env.finish(kj::mv(first.response), kj::mv(head), OK_HELLO);
  KJ_EXPECT(r.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/third", OK_HELLO).body == "hello");
}

BOTH_TRANSPORTS(unreadBodyRefused,
    "StreamFetcher refuses the next request while a body is unread, then drops the connection") {
  auto first = env.get("/first");
  first.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel");
  auto r = first.response.wait(env.ws);
  KJ_EXPECT_THROW_MESSAGE("one request at a time", env.get("/second"));
  KJ_EXPECT(env.peer->readWouldBlock());
  r.body = nullptr;  // dropped before its end
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "dropped before its end"), env.closeReason());
  KJ_EXPECT_THROW_MESSAGE("dropped before its end", env.get("/third"));
  written.wait(env.ws);
  KJ_EXPECT(env.peer->readWouldBlock() || env.peer->sawEof());
}

// =================================================================================================
// Connection failures

BOTH_TRANSPORTS(peerDiesMidRequest, "StreamFetcher reports a peer that closes mid-response") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send("HTTP/1.1 200 OK\r\nContent-Le");
  env.peer->close();
  // A connection cut short, not a malformed response: DISCONNECTED, saying so.
  KJ_EXPECT_THROW(DISCONNECTED, req.response.wait(env.ws));
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "closed in the middle of the response head"),
      env.closeReason());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::FAILED);
  KJ_EXPECT(env.fetcher->lastExchangeReceivedResponse());
  KJ_EXPECT_THROW(DISCONNECTED, env.get());
}

BOTH_TRANSPORTS(peerDiesMidBody, "StreamFetcher reports a peer that closes mid-body") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf");
  auto r = req.response.wait(env.ws);
  auto text = r.body->readAllText();
  written.wait(env.ws);
  env.peer->close();
  auto e = KJ_ASSERT_NONNULL(kj::runCatchingExceptions([&]() { text.wait(env.ws); }));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), "before the end of the response body"), e);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
}

BOTH_TRANSPORTS(peerNeverAnswers, "StreamFetcher lets the caller time out a silent peer") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  auto timeout = env.io.provider->getTimer().afterDelay(50 * kj::MILLISECONDS)
      .then([]() -> kj::HttpClient::Response {
    kj::throwFatalException(KJ_EXCEPTION(OVERLOADED, "timed out"));
  });
  KJ_EXPECT_THROW_MESSAGE("timed out", req.response.exclusiveJoin(kj::mv(timeout)).wait(env.ws));
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "cancelled before its response"), env.closeReason());
}

BOTH_TRANSPORTS(malformedChunk, "StreamFetcher drops the connection on a malformed chunked body") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater(
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n");
  auto r = req.response.wait(env.ws);
  KJ_EXPECT_THROW_MESSAGE("chunk", r.body->readAllText().wait(env.ws));
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  r.body = nullptr;
  env.peer->close();
}

// =================================================================================================
// When reuse ends

BOTH_TRANSPORTS(connectionClose, "StreamFetcher drops the connection after Connection: close") {
  auto r = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello");
  KJ_EXPECT(r.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "Connection: close"), env.closeReason());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::CONNECTION_CLOSE);
  KJ_EXPECT_THROW_MESSAGE("Connection: close", env.get());
  KJ_EXPECT(env.peer->sawEof(), "the dropped connection was not closed");
}

BOTH_TRANSPORTS(http10, "StreamFetcher treats HTTP/1.0 as reusable only with keep-alive") {
  auto r1 = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello");
  KJ_EXPECT(r1.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  auto r2 = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
  KJ_EXPECT(r2.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "HTTP/1.0"), env.closeReason());
}

BOTH_TRANSPORTS(eofDelimited, "StreamFetcher reads a body delimited by EOF, then is closed") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  auto sent = env.peer->sendLater("HTTP/1.1 200 OK\r\n\r\nuntil the end");
  auto r = req.response.wait(env.ws);
  sent.wait(env.ws);
  auto text = r.body->readAllText();
  env.peer->close();
  KJ_EXPECT(text.wait(env.ws) == "until the end");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "delimited by the server closing"), env.closeReason());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::NOT_REUSABLE);
}

// =================================================================================================
// Interim responses, bodiless responses, upgrades

BOTH_TRANSPORTS(continue100, "StreamFetcher skips 100 Continue and reuses the connection") {
  auto h = env.headers();
  h.add("Expect", "100-continue");
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/upload", h, uint64_t(4));
  auto head = env.peer->readHead();
  KJ_EXPECT(contains(head, "Expect: 100-continue"));
  auto interim = env.peer->sendLater("HTTP/1.1 100 Continue\r\n\r\n");
  auto write = writeAll(*req.body, "data"_kj.asBytes());
  KJ_EXPECT(env.peer->readExactly(4) == "data");
  write.wait(env.ws);
  req.body = nullptr;
  interim.wait(env.ws);
  auto r = env.finish(kj::mv(req.response), kj::mv(head),
      "HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
  KJ_EXPECT(r.status == 201);
  KJ_EXPECT(r.body == "ok");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
}

BOTH_TRANSPORTS(earlyHints103, "StreamFetcher skips 103 Early Hints (and several 1xx)") {
  auto r = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
      "HTTP/1.1 102 Processing\r\n\r\n"
      "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
  KJ_EXPECT(r.status == 200);
  KJ_EXPECT(r.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
}

BOTH_TRANSPORTS(bodiless, "StreamFetcher treats HEAD, 204 and 304 as bodiless and reuses at once") {
  {
    auto req = env.fetcher->request(kj::HttpMethod::HEAD, "/", env.headers());
    req.body = nullptr;
    env.peer->readRequest();
    auto sent = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n");
    auto r = req.response.wait(env.ws);
    sent.wait(env.ws);
    KJ_EXPECT(r.statusCode == 200);
    // The connection is back before the (empty) body is even looked at.
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
    KJ_EXPECT(KJ_ASSERT_NONNULL(r.headers->get(kj::HttpHeaderId::CONTENT_LENGTH)) == "1234");
    KJ_EXPECT(r.body->readAllText().wait(env.ws) == "");
  }
  auto r204 = env.exchange(kj::HttpMethod::GET, "/", "HTTP/1.1 204 No Content\r\n\r\n");
  KJ_EXPECT(r204.status == 204);
  KJ_EXPECT(r204.body == "");
  auto r304 = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n");
  KJ_EXPECT(r304.status == 304);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 3);
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
}

BOTH_TRANSPORTS(webSocketUpgrade,
    "StreamFetcher hands the connection to a WebSocket on 101, keeping bytes after the 101") {
  auto h = env.headers();
  auto promise = env.fetcher->openWebSocket("/ws", h);
  auto head = env.peer->readHead();
  KJ_EXPECT(head.startsWith("GET /ws HTTP/1.1\r\n"), head);
  auto keyStart = strstr(head.cStr(), "Sec-WebSocket-Key: ");
  KJ_ASSERT(keyStart != nullptr, head);
  keyStart += strlen("Sec-WebSocket-Key: ");
  auto key = kj::heapString(keyStart, strchr(keyStart, '\r') - keyStart);
  // The 101 and the first frame (unmasked text "hi") in one write.
  auto handshake = kj::str("HTTP/1.1 101 Switching Protocols\r\n"
      "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
      test::webSocketAccept(key), "\r\n\r\n\x81\x02hi");
  auto written = env.peer->sendLater(handshake);
  auto response = promise.wait(env.ws);
  KJ_EXPECT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto message = socket.receive().wait(env.ws);
  KJ_EXPECT(KJ_ASSERT_NONNULL(message.tryGet<kj::String>()) == "hi");
  written.wait(env.ws);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "upgraded"), env.closeReason());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UPGRADED);
  // The WebSocket owns the connection: a reply reaches the peer (masked client frame, 2 + 4 + 2).
  auto sent = socket.send("yo"_kj);
  KJ_EXPECT(env.peer->readExactly(8).size() == 8);
  sent.wait(env.ws);
}

BOTH_TRANSPORTS(webSocketRefused,
    "StreamFetcher treats a refused WebSocket handshake like any response, and reuses") {
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  auto head = env.peer->readHead();
  KJ_EXPECT(head.startsWith("GET /ws HTTP/1.1\r\n"), head);
  auto written = env.peer->sendLater("HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope");
  auto response = promise.wait(env.ws);
  KJ_EXPECT(response.statusCode == 404);
  auto& body = *KJ_ASSERT_NONNULL(
      response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>());
  KJ_EXPECT(body.readAllText().wait(env.ws) == "nope");
  written.wait(env.ws);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
}

// =================================================================================================
// Chunked framing

BOTH_TRANSPORTS(chunkedTrailers, "StreamFetcher consumes chunked trailers before reuse") {
  auto r = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
      "5\r\nhello\r\n0\r\nX-Checksum: 1234\r\nX-Other: y\r\n\r\n");
  KJ_EXPECT(r.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 2);
}

BOTH_TRANSPORTS(chunkedLateCrlf,
    "StreamFetcher waits for a chunked terminator's CRLF sent later before reuse") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  auto sent = env.peer->sendLater(
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n");
  auto r = req.response.wait(env.ws);
  sent.wait(env.ws);
  auto text = r.body->readAllText();
  KJ_EXPECT(!text.poll(env.ws), "body ended before the final CRLF arrived");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::BUSY);
  env.peer->sendLater("\r\n").wait(env.ws);
  KJ_EXPECT(text.wait(env.ws) == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
}

BOTH_TRANSPORTS(largeBodies, "StreamFetcher streams large bodies of both framings and reuses") {
  auto big = kj::heapString(1 << 20);
  for (size_t i = 0; i < big.size(); i++) big[i] = 'a' + i % 26;
  auto fixed = env.exchange(kj::HttpMethod::GET, "/fixed",
      kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", big.size(), "\r\n\r\n", big));
  KJ_EXPECT(fixed.body == big);
  kj::Vector<char> chunked;
  chunked.addAll("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"_kj);
  for (size_t pos = 0; pos < big.size(); pos += 3000) {
    size_t n = kj::min(size_t(3000), big.size() - pos);
    chunked.addAll(kj::str(kj::hex(n), "\r\n"));
    chunked.addAll(big.slice(pos, pos + n));
    chunked.addAll("\r\n"_kj);
  }
  chunked.addAll("0\r\n\r\n"_kj);
  chunked.add('\0');
  auto result = env.exchange(kj::HttpMethod::GET, "/chunked", kj::StringPtr(chunked.begin(),
      chunked.size() - 1));
  KJ_EXPECT(result.body == big);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 2);
}

BOTH_TRANSPORTS(largeUploads,
    "StreamFetcher uploads bodies larger than the socket buffers intact, and reuses") {
  // On a socket, what the kernel takes at once is sent directly and the rest by kj's write,
  // later: every byte must arrive once, in order, in both framings (a chunked body is written as
  // pieces: size line, data, CRLF).
  auto big = kj::heapString(16 << 20);
  for (size_t i = 0; i < big.size(); i++) big[i] = 'a' + (i * 7 + i / 4093) % 26;
  auto bodyOf = [](kj::StringPtr request) {
    auto end = strstr(request.cStr(), "\r\n\r\n");
    KJ_ASSERT(end != nullptr);
    return kj::StringPtr(end + 4);
  };
  {
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/fixed", env.headers(), big.size());
    auto written = writeAll(*req.body, big.asBytes()).eagerlyEvaluate(nullptr);
    auto request = env.peer->readRequest();
    written.wait(env.ws);
    KJ_EXPECT(bodyOf(request) == big, "the fixed-length body arrived changed");
    req.body = nullptr;
    auto sent = env.peer->sendLater(OK_HELLO);
    KJ_EXPECT(req.response.wait(env.ws).body->readAllText().wait(env.ws) == "hello");
    sent.wait(env.ws);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  }
  {
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/chunked", env.headers());
    auto body = kj::mv(req.body);
    auto written = writeAll(*body, big.asBytes().slice(0, 5 << 20))
        .then([&]() { return writeAll(*body, big.asBytes().slice(5 << 20, big.size())); })
        .then([&]() { body = nullptr; }).eagerlyEvaluate(nullptr);
    auto request = env.peer->readRequest();
    written.wait(env.ws);
    KJ_EXPECT(bodyOf(request) == big, "the chunked body arrived changed");
    auto sent = env.peer->sendLater(OK_HELLO);
    KJ_EXPECT(req.response.wait(env.ws).body->readAllText().wait(env.ws) == "hello");
    sent.wait(env.ws);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  }
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 3);
}

BOTH_TRANSPORTS(largeHead, "StreamFetcher accepts a 20 KiB response head and reuses") {
  auto value = kj::heapString(20000);
  for (auto& c: value) c = 'v';
  auto r = env.exchange(kj::HttpMethod::GET, "/",
      kj::str("HTTP/1.1 200 OK\r\nX-Large: ", value, "\r\nContent-Length: 5\r\n\r\nhello"));
  KJ_EXPECT(r.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
}

BOTH_TRANSPORTS(headerNamesAsKjReadsThem,
    "StreamFetcher frames a response by the same header fields kj-http reads") {
  // Whitespace before the colon: kj-http takes the field, and so must the framer.
  auto r = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello");
  KJ_EXPECT(r.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  // A folded line is part of the field before it, not a Content-Length of its own.
  r = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.1 200 OK\r\nX-A: 1\r\n Content-Length: 9\r\nContent-Length: 2\r\n\r\nok");
  KJ_EXPECT(r.body == "ok");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  // Transfer-Encoding (with whitespace before its colon) wins over Content-Length: kj-http reads
  // the chunked body; the connection is not reused, and nothing waits for bytes never coming.
  auto request = env.get();
  request.body = nullptr;
  env.peer->readRequest();
  auto sent = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
      "Transfer-Encoding : chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n");
  auto response = env.waitAtMost(kj::mv(request.response));
  KJ_EXPECT(env.waitAtMost(response.body->readAllText()) == "0123456789");
  sent.wait(env.ws);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::NOT_REUSABLE);
  KJ_EXPECT(contains(env.closeReason(), "both Transfer-Encoding and Content-Length"),
      env.closeReason());
}

BOTH_TRANSPORTS(oversizedHead, "StreamFetcher rejects a response head over its limit") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  auto value = kj::heapString(70000);
  for (auto& c: value) c = 'v';
  auto text = kj::str("HTTP/1.1 200 OK\r\nX-Large: ", value, "\r\n\r\n");
  auto written = env.peer->sendLater(text);
  KJ_EXPECT_THROW_MESSAGE("Limits::maxHeaderBytes (65536)",
      req.response.wait(env.ws));
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  written = nullptr;
}

// =================================================================================================
// Poisoning

BOTH_TRANSPORTS(extraBytesSameWrite,
    "StreamFetcher drops the connection when bytes follow the response in the same write") {
  auto r = env.exchange(kj::HttpMethod::GET, "/",
      "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
      "\r\nbad");
  KJ_EXPECT(r.body == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "after the end of the response"), env.closeReason());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
  KJ_EXPECT_THROW_MESSAGE("poisoned", env.get());
}

BOTH_TRANSPORTS(unsolicitedWhileIdle,
    "StreamFetcher drops an idle connection on which the server sends unsolicited bytes") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  auto unsolicited = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad");
  // Not even one more turn of the event loop: the next request must still not see these bytes.
  KJ_EXPECT_THROW_MESSAGE("poisoned", env.getAndWait());
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  // The request itself was never written.
  unsolicited = nullptr;
  KJ_EXPECT(env.peer->sawEof(), "the request was written to a poisoned connection");
}

BOTH_TRANSPORTS(unsolicitedWhileIdleLater,
    "StreamFetcher notices unsolicited bytes on an idle connection by itself") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  auto unsolicited = env.peer->sendLater("garbage");
  env.waitForState(StreamFetcher::State::CLOSED);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "idle connection"), env.closeReason());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
  KJ_EXPECT_THROW_MESSAGE("poisoned", env.get());
  unsolicited = nullptr;
  KJ_EXPECT(env.peer->sawEof(), "the poisoned connection was not closed");
}

BOTH_TRANSPORTS(idleByteRace,
    "StreamFetcher never loses a byte the idle read took just before the next request") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  // Exactly one unsolicited byte: the idle read takes all of it, so the kernel has nothing left to
  // show. The request starts from a timer callback: on a socket the byte and the timer are
  // reported by the same poll, so the idle read may have consumed the byte while its continuation
  // is still queued behind the request.
  auto unsolicited = env.peer->sendLater("X");
  auto& timer = env.io.provider->getTimer();
  kj::Maybe<kj::HttpClient::Request> started;
  kj::Maybe<kj::Exception> refused;
  timer.afterDelay(0 * kj::MILLISECONDS).then([&]() {
    refused = kj::runCatchingExceptions([&]() { started = env.get(); });
  }).wait(env.ws);
  KJ_IF_SOME(request, started) {
    request.body = nullptr;
    KJ_EXPECT_THROW_MESSAGE("poisoned", env.waitAtMost(kj::mv(request.response)));
  } else {
    KJ_EXPECT(contains(KJ_ASSERT_NONNULL(refused).getDescription(), "poisoned"));
  }
  unsolicited.wait(env.ws);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES,
      env.anyReason());
  KJ_EXPECT(env.peer->sawEof(), "a request was written after an unsolicited byte");
}

BOTH_TRANSPORTS(idleByteRaceRelease,
    "StreamFetcher::release() keeps a byte the idle read took, even past a zero-length read") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  auto sent = env.peer->sendLater("XY");
  auto stream = env.fetcher->release();
  char buffer[4];
  KJ_EXPECT(env.waitAtMost(stream->tryRead(buffer, 0, 0)) == 0);
  size_t n = env.waitAtMost(stream->tryRead(buffer, 2, sizeof(buffer)));
  KJ_EXPECT(kj::heapString(buffer, n) == "XY");
  sent.wait(env.ws);
}

TLS_LIKE_TRANSPORTS(tlsLikeReuse, "StreamFetcher reuses a connection through a TLS-like stream") {
  for (int i = 0; i < 20; i++) {
    KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.anyReason());
  }
}

TLS_LIKE_TRANSPORTS(tlsLikeIdleRace,
    "StreamFetcher never takes what a TLS-like stream read while idle as the next response") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  // The server times the idle connection out. The next request comes from a timer reported in
  // the same poll as these bytes, while the stream's read of them is still events from done.
  auto sent = env.peer->sendLater("HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n");
  kj::Maybe<kj::HttpClient::Request> started;
  kj::Maybe<kj::Exception> refused;
  env.io.provider->getTimer().afterDelay(0 * kj::MILLISECONDS).then([&]() {
    refused = kj::runCatchingExceptions([&]() { started = env.get(); });
  }).wait(env.ws);
  KJ_IF_SOME(request, started) {
    request.body = nullptr;
    KJ_EXPECT_THROW_MESSAGE("poisoned", env.waitAtMost(kj::mv(request.response)));
  } else {
    KJ_EXPECT(contains(KJ_ASSERT_NONNULL(refused).getDescription(), "poisoned"));
  }
  sent.wait(env.ws);
  KJ_EXPECT(env.peer->sawEof(), "a request was written after the server's 408");
}

TLS_LIKE_TRANSPORTS(tlsLikeUnpolledInput,
    "StreamFetcher sees what the server sent to an idle TLS-like connection before a poll") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  // Idle long enough for the idle read to wait on the socket; then bytes arrive and a request is
  // made before the event loop polls again.
  env.io.provider->getTimer().afterDelay(5 * kj::MILLISECONDS).wait(env.ws);
  auto sent = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad");
  KJ_EXPECT_THROW_MESSAGE("poisoned", env.getAndWait());
  sent = nullptr;
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
  KJ_EXPECT(env.peer->sawEof(), "a request was written after the unsolicited bytes");
}

TLS_LIKE_TRANSPORTS(tlsLikeBusyLoop,
    "StreamFetcher writes a request promptly while the event loop is never idle") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  env.io.provider->getTimer().afterDelay(5 * kj::MILLISECONDS).wait(env.ws);  // idle read started
  // From now on the queue never empties (I/O is still polled, every 16 turns).
  env.ws.setBusyPollInterval(16);
  bool spinning = true;
  kj::Function<kj::Promise<void>()> spin = [&]() -> kj::Promise<void> {
    if (!spinning) return kj::READY_NOW;
    return kj::evalLater([&]() { return spin(); });
  };
  auto background = spin();
  auto request = env.get();
  request.body = nullptr;
  char head[14];
  auto got = env.waitAtMost(env.peer->getStream().read(head, sizeof(head), sizeof(head)),
      1 * kj::SECONDS);
  KJ_EXPECT(kj::heapString(head, got) == "GET / HTTP/1.1");
  auto sent = env.peer->sendLater(OK_HELLO);
  auto response = env.waitAtMost(kj::mv(request.response));
  KJ_EXPECT(env.waitAtMost(response.body->readAllText()) == "hello");
  spinning = false;
  background.wait(env.ws);
  sent.wait(env.ws);
  env.ws.setBusyPollInterval(kj::maxValue);
}

TLS_LIKE_TRANSPORTS(tlsLikeReadAhead,
    "StreamFetcher drops a TLS-like connection that read ahead past the response") {
  // The body and an extra response arrive together while the body is read straight into the
  // consumer's buffer (at most the body's length): the wrapper keeps the rest in its own buffer,
  // where the kernel cannot show it, but the connection is poisoned all the same. The next request
  // is made from the body's own continuation, before anything else can run.
  auto first = env.get();
  first.body = nullptr;
  env.peer->readRequest();
  auto body = kj::heapString(3000);  // big enough to be read straight into the caller's buffer
  for (auto& c: body) c = 'x';
  env.peer->send("HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n");
  auto response = env.waitAtMost(kj::mv(first.response));
  auto rest = kj::str(body, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad");
  auto sent = env.peer->sendLater(rest);
  auto second = response.body->readAllText().then([&](kj::String text) {
    KJ_EXPECT(text == body);
    auto request = env.get();
    request.body = nullptr;
    return request.response.then([](kj::HttpClient::Response&& response) {
      return response.body->readAllText().attach(kj::mv(response.body));
    });
  });
  KJ_EXPECT_THROW_MESSAGE("poisoned", env.waitAtMost(kj::mv(second)));
  sent = nullptr;  // on a pipe the rest is never read
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
  response.body = nullptr;  // a failed exchange's connection closes once its body is dropped
  KJ_EXPECT(env.peer->sawEof(), "a request was written to a poisoned connection");
}

BOTH_TRANSPORTS(peerClosesIdle, "StreamFetcher notices the peer closing the idle connection") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  env.peer->close();
  // Requested right away: noticed before the request is written.
  KJ_EXPECT_THROW_MESSAGE("closed the idle connection", env.getAndWait());
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT_THROW(DISCONNECTED, env.get());
}

BOTH_TRANSPORTS(peerClosesIdleLater, "StreamFetcher notices an idle close by itself") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  env.peer->close();
  env.waitForState(StreamFetcher::State::CLOSED);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(env.closeReason() == "the server closed the idle connection", env.closeReason());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::PEER_CLOSED_IDLE);
  KJ_EXPECT_THROW_MESSAGE("the server closed the idle connection", env.get());
}

// =================================================================================================
// Cancellation

BOTH_TRANSPORTS(cancelDuringRequestBody,
    "StreamFetcher drops the connection when the request body is abandoned") {
  {
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(10));
    auto write = writeAll(*req.body, "12345"_kj.asBytes());
    env.peer->readHead();
    KJ_EXPECT(env.peer->readExactly(5) == "12345");
    write.wait(env.ws);
    // Caller gives up: body dropped with 5 of 10 bytes written (then the response).
    req.body = nullptr;
  }
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "5 of its 10 bytes"), env.closeReason());
  KJ_EXPECT_THROW_MESSAGE("5 of its 10 bytes", env.get());
}

BOTH_TRANSPORTS(cancelDuringHeaders,
    "StreamFetcher drops the connection when the response is cancelled during its headers") {
  {
    auto req = env.get();
    req.body = nullptr;
    env.peer->readRequest();
    auto partial = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-");
    KJ_EXPECT(!req.response.poll(env.ws));
    partial.wait(env.ws);
  }
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "cancelled before its response"), env.closeReason());
  KJ_EXPECT(env.peer->sawEof());
}

BOTH_TRANSPORTS(cancelDuringBody,
    "StreamFetcher drops the connection when a body read is cancelled") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  auto sent = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome");
  auto r = req.response.wait(env.ws);
  sent.wait(env.ws);
  {
    auto text = r.body->readAllText();
    KJ_EXPECT(!text.poll(env.ws));
  }  // read cancelled
  r.body = nullptr;
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "dropped before its end"), env.closeReason());
  KJ_EXPECT(env.peer->sawEof());
}

BOTH_TRANSPORTS(shortBodyFailsResponse,
    "StreamFetcher fails the response at once when a fixed-length body is dropped short") {
  auto req = env.fetcher->request(kj::HttpMethod::PUT, "/", env.headers(), uint64_t(100));
  auto write = writeAll(*req.body, "0123456789"_kj.asBytes());
  env.peer->readHead();
  KJ_EXPECT(env.peer->readExactly(10) == "0123456789");
  write.wait(env.ws);
  req.body = nullptr;  // the server still waits for 90 bytes: no response will ever come
  KJ_EXPECT_THROW_MESSAGE("dropped after 10 of its 100 bytes",
      env.waitAtMost(kj::mv(req.response)));
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::ABANDONED);
}

BOTH_TRANSPORTS(closeHeardWhenResponseOver,
    "StreamFetcher closes a failed exchange's connection once its response is over, not before") {
  // A fixed-length request body dropped short fails the exchange (the fetcher is CLOSED at once),
  // but the response already coming is still read from the connection: only when it is over is
  // the connection closed and the observer (a pool counting open connections) told.
  struct Counter final: public StreamFetcher::Observer {
    unsigned closed = 0;
    void fetcherIdle(StreamFetcher&) override {}
    void fetcherClosed(StreamFetcher&) override { ++closed; }
  } counter;
  env.fetcher->setObserver(counter);
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(10));
  auto write = writeAll(*req.body, "12345"_kj.asBytes());
  env.peer->readHead();
  KJ_EXPECT(env.peer->readExactly(5) == "12345");
  write.wait(env.ws);
  auto sent = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab");
  auto r = req.response.wait(env.ws);
  char text[4];
  KJ_EXPECT(r.body->tryRead(text, 2, 2).wait(env.ws) == 2);
  sent.wait(env.ws);
  req.body = nullptr;
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::ABANDONED);
  KJ_EXPECT(counter.closed == 0, "told of a close while the response is still being read");
  if (env.tcp) {
    KJ_EXPECT(env.peer->readWouldBlock(), "the connection closed under its response");
  }
  auto rest = env.peer->sendLater("cd");
  KJ_EXPECT(r.body->tryRead(text + 2, 2, 2).wait(env.ws) == 2);
  KJ_EXPECT(kj::heapString(text, 4) == "abcd");
  rest.wait(env.ws);
  KJ_EXPECT(counter.closed == 1);
  if (env.tcp) {
    KJ_EXPECT(env.peer->sawEof(), "the connection stayed open after its response");
  }
  env.fetcher->setObserver(nullptr);
}

BOTH_TRANSPORTS(earlyResponse,
    "StreamFetcher drops the connection when the response ends before the request body") {
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(10));
  auto write = writeAll(*req.body, "12345"_kj.asBytes());
  env.peer->readHead();
  KJ_EXPECT(env.peer->readExactly(5) == "12345");
  write.wait(env.ws);
  auto written = env.peer->sendLater(
      "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig");
  auto r = req.response.wait(env.ws);
  KJ_EXPECT(r.statusCode == 413);
  KJ_EXPECT(r.body->readAllText().wait(env.ws) == "big");
  written.wait(env.ws);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "5 of the 10 request body bytes"), env.closeReason());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::REQUEST_INCOMPLETE);
  // The caller still holds the request body, and so the connection, yet it is closed now: the
  // server sees it go (a pool no longer counts it). The rest of the body is taken and discarded,
  // as the server would: a caller pumping it on (kj::newHttpService() does) ends normally.
  if (env.tcp) {
    KJ_EXPECT(env.peer->sawEof());
  }
  req.body->write("x", 1).wait(env.ws);
  writeAll(*req.body, "6789"_kj.asBytes()).wait(env.ws);
  req.body = nullptr;
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::REQUEST_INCOMPLETE);
  if (env.tcp) {
    KJ_EXPECT(env.peer->sawEof(), "a discarded byte reached the server");
  }
}

// =================================================================================================
// release()

BOTH_TRANSPORTS(releaseKeepsReadAhead, "StreamFetcher::release() loses no byte already read") {
  KJ_EXPECT(env.exchange(kj::HttpMethod::GET, "/", OK_HELLO).body == "hello");
  auto sent = env.peer->sendLater("after the response");
  // The idle watch may already have read part of it: release() must hand all of it back.
  auto stream = env.fetcher->release();
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::RELEASED);
  char buffer[64];
  size_t n = stream->tryRead(buffer, 18, sizeof(buffer)).wait(env.ws);
  KJ_EXPECT(kj::heapString(buffer, n) == "after the response");
  sent.wait(env.ws);
  // And the stream is fully usable in both directions.
  auto w = writeAll(*stream, "ping"_kj.asBytes());
  KJ_EXPECT(env.peer->readExactly(4) == "ping");
  w.wait(env.ws);
  KJ_EXPECT_THROW_MESSAGE("release()", env.get());
}

BOTH_TRANSPORTS(releaseWhileBusy, "StreamFetcher::release() refuses while busy") {
  auto req = env.get();
  req.body = nullptr;
  KJ_EXPECT_THROW_MESSAGE("idle StreamFetcher", env.fetcher->release());
  env.peer->readRequest();
  auto r = env.finish(kj::mv(req.response), kj::str(), OK_HELLO);
  KJ_EXPECT(r.body == "hello");
  auto stream = env.fetcher->release();
  KJ_EXPECT(env.peer->readWouldBlock());
}

// =================================================================================================
// Destruction in any order

BOTH_TRANSPORTS(destroyFetcherWithResponseInFlight,
    "StreamFetcher may be destroyed while a response is in flight") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  env.fetcher = nullptr;
  auto r = env.finish(kj::mv(req.response), kj::str(), OK_HELLO);
  KJ_EXPECT(r.body == "hello");
  KJ_EXPECT(env.peer->sawEof(), "connection not closed after its fetcher went away");
}

BOTH_TRANSPORTS(destroyFetcherBeforeBody, "StreamFetcher's response body may outlive it") {
  auto req = env.get();
  req.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater(OK_HELLO);
  auto r = req.response.wait(env.ws);
  env.fetcher = nullptr;
  KJ_EXPECT(r.body->readAllText().wait(env.ws) == "hello");
  written.wait(env.ws);
  r.body = nullptr;
  KJ_EXPECT(env.peer->sawEof());
}

BOTH_TRANSPORTS(destroyFetcherFirst,
    "StreamFetcher may be destroyed before the request body and response promise") {
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers());
  env.fetcher = nullptr;
  req.response = nullptr;
  req.body = nullptr;
  // Nothing was written (the request never got past its first turn), and the connection ends.
  KJ_EXPECT(env.peer->sawEof());
}

BOTH_TRANSPORTS(destroyBodyDuringRead,
    "StreamFetcher's body may be dropped while a read is pending, after the fetcher") {
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel");
  auto r = req.response.wait(env.ws);
  written.wait(env.ws);
  env.fetcher = nullptr;
  auto read = r.body->readAllText();
  KJ_EXPECT(!read.poll(env.ws));
  r.body = nullptr;  // the body before its pending read
  read = nullptr;
  KJ_EXPECT(env.peer->sawEof());
}

BOTH_TRANSPORTS(destroyResponsePromiseFirst,
    "StreamFetcher closes when the response promise is dropped before the request body") {
  auto req = env.get();
  req.response = nullptr;  // response promise first, request body still held
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(contains(env.closeReason(), "cancelled before its response"), env.closeReason());
  req.body = nullptr;
  env.fetcher = nullptr;
}

}  // namespace
}  // namespace sockfetch
