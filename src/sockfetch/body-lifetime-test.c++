// What a response body outlives, and what outlives it: bodies dropped from their own read
// continuations, before their pending reads, while waiting for late trailers, and by the
// fetcher's observer; bodies and their headers kept across many later exchanges, a release() and
// the fetcher's destruction; bodiless responses; 101 through request(); fetchers and pools
// destroyed mid-exchange with large, chunked and trailer-delayed bodies (the connection closes as
// soon as the response is over); the stale keep-alive retry. Pipes, loopback TCP and the TLS-like
// wrapper; every wait is bounded.

#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/fetcher-env.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::contains;
using test::header;
using test::OK_HELLO;
using Env = test::FetcherEnv;
using Kind = StreamFetcher::CloseKind;
using State = StreamFetcher::State;
using Response = kj::HttpClient::Response;

#define BOTH_TRANSPORTS(name, description) \
  SOCKFETCH_TRANSPORT_PAIR(Env, name, description, "pipe", (false), "tcp", (true))
#define TLS_LIKE_TRANSPORTS(name, description) \
  SOCKFETCH_TRANSPORT_PAIR(Env, name, description, "tls-like over pipe", (false, true), \
      "tls-like over tcp", (true, true))
#define TCP_AND_TLS_LIKE(name, description) \
  SOCKFETCH_TRANSPORT_PAIR(Env, name, description, "tcp", (true, false), \
      "tls-like over tcp", (true, true))

kj::Promise<Response> requestThenDropFetcher(Env& env, kj::StringPtr url) {
  // Sends a bodiless GET, lets the server read it, then destroys the fetcher mid-exchange.
  auto h = env.headers();
  auto req = env.fetcher->request(kj::HttpMethod::GET, url, h);
  req.body = nullptr;
  env.peer->readRequest();
  env.fetcher = nullptr;
  return kj::mv(req.response);
}

// =================================================================================================
// Bodies dropped from their own read continuations

BOTH_TRANSPORTS(dropMidBodyInContinuation,
    "a body dropped from the continuation of its own partial read abandons the "
    "connection") {
  auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 Partial\r\nX-A: a\r\n"
      "Content-Length: 11\r\n\r\nhello world");
  auto body = kj::mv(s.response.body);
  char buffer[16];
  auto read = body->tryRead(buffer, 3, 3).then([&](size_t n) {
    // The headers are still valid here: the body is not dropped yet.
    KJ_EXPECT(s.response.statusText == "Partial");
    KJ_EXPECT(header(*s.response.headers, "X-A") == "a");
    body = nullptr;
    return n;
  });
  KJ_EXPECT(env.bounded(kj::mv(read)) == 3);
  KJ_EXPECT(body.get() == nullptr);
  KJ_EXPECT(memcmp(buffer, "hel", 3) == 0);
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.why());
  env.bounded(kj::mv(s.written));
  KJ_EXPECT(env.peerSawEnd());
}

BOTH_TRANSPORTS(dropAtEndInContinuation,
    "a body dropped from the continuation of the read that reached its end keeps the "
    "connection, and the next request can start from there") {
  for (auto reply: {"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj,
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"_kj}) {
    auto s = env.start(kj::HttpMethod::GET, "/", reply);
    auto body = kj::mv(s.response.body);
    char buffer[16];
    kj::Maybe<Env::Started> next;
    auto read = body->tryRead(buffer, 16, 16).then([&](size_t n) {
      body = nullptr;
      KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
      // Start the next request right here, from the continuation.
      auto h = env.headers();
      auto req = env.fetcher->request(kj::HttpMethod::GET, "/inner", h);
      req.body = nullptr;
      return req.response.then([n](Response&& r) {
        return r.body->readAllText().attach(kj::mv(r.body)).then([n](kj::String text) {
          KJ_EXPECT(text == "hello");
          return n;
        });
      });
    }).eagerlyEvaluate(nullptr);
    env.bounded(kj::mv(s.written));
    auto request = env.peer->readRequest();
    KJ_EXPECT(request.startsWith("GET /inner HTTP/1.1\r\n"), request);
    auto written = env.peer->sendLater(OK_HELLO);
    KJ_EXPECT(env.bounded(kj::mv(read)) == 5);
    env.bounded(kj::mv(written));
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    env.roundTrip();
  }
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 6);
}

TLS_LIKE_TRANSPORTS(dropAfterLateTrailersInContinuation,
    "chunked trailers arriving late complete the read; the body dropped in its "
    "continuation, with its headers checked there, keeps the connection") {
  auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 Trailing\r\nX-T: t\r\n"
      "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n");
  auto body = kj::mv(s.response.body);
  char buffer[16];
  KJ_EXPECT(env.read(*body, buffer, 5, 5) == 5);
  env.bounded(kj::mv(s.written));
  bool ran = false;
  auto read = body->tryRead(buffer, 1, 16).then([&](size_t n) {
    KJ_EXPECT(s.response.statusText == "Trailing");
    KJ_EXPECT(header(*s.response.headers, "X-T") == "t");
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    body = nullptr;
    ran = true;
    return n;
  }).eagerlyEvaluate(nullptr);
  env.settle(5 * kj::MILLISECONDS);
  KJ_EXPECT(!ran, "the body ended before its trailers");
  KJ_EXPECT(env.fetcher->getState() == State::BUSY, env.why());
  env.bounded(env.peer->sendLater("X-Late: 1\r\n"));
  env.settle(5 * kj::MILLISECONDS);
  KJ_EXPECT(!ran);
  env.bounded(env.peer->sendLater("\r\n"));
  KJ_EXPECT(env.bounded(kj::mv(read)) == 0);
  KJ_EXPECT(ran);
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  env.roundTrip();
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 2);
}

class Observer final: public StreamFetcher::Observer {
public:
  kj::Function<void(StreamFetcher&)> onIdle = [](StreamFetcher&) {};
  kj::Function<void(StreamFetcher&)> onClosed = [](StreamFetcher&) {};
  unsigned idle = 0;
  unsigned closed = 0;
  void fetcherIdle(StreamFetcher& f) override { ++idle; onIdle(f); }
  void fetcherClosed(StreamFetcher& f) override { ++closed; onClosed(f); }
};

BOTH_TRANSPORTS(dropFromFetcherClosedWhenTrailersFail,
    "the body dropped by fetcherClosed() (which may drop anything but the fetcher) when the "
    "read that awaits its trailers fails") {
  Observer observer;
  kj::Own<kj::AsyncInputStream> body;
  observer.onClosed = [&](StreamFetcher&) { body = nullptr; };
  env.fetcher->setObserver(observer);
  auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 OK\r\n"
      "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n");
  body = kj::mv(s.response.body);
  char buffer[16];
  KJ_EXPECT(env.read(*body, buffer, 5, 5) == 5);
  env.bounded(kj::mv(s.written));
  auto read = body->tryRead(buffer, 1, 16).then([](size_t n) -> kj::Maybe<kj::Exception> {
    KJ_FAIL_EXPECT("the read succeeded with its trailers cut off", n);
    return nullptr;
  }, [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); });
  KJ_EXPECT(!read.poll(env.ws));
  // The server goes away in the middle of the trailers: the response is malformed.
  if (env.tcp) test::resetConnection(*env.peer); else env.peer->close();
  auto failure = env.bounded(kj::mv(read));
  KJ_EXPECT(failure != nullptr);
  KJ_EXPECT(observer.closed == 1);
  KJ_EXPECT(body.get() == nullptr);
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::FAILED, env.why());
  env.fetcher->setObserver(nullptr);
}

BOTH_TRANSPORTS(dropFromFetcherIdleAtEnd,
    "the body dropped by fetcherIdle() from the read that reached its end (fixed "
    "length and chunked with late trailers)") {
  Observer observer;
  kj::Own<kj::AsyncInputStream> body;
  observer.onIdle = [&](StreamFetcher&) { body = nullptr; };
  env.fetcher->setObserver(observer);
  for (auto reply: {"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj,
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"_kj}) {
    auto s = env.start(kj::HttpMethod::GET, "/", reply);
    body = kj::mv(s.response.body);
    char buffer[16];
    auto read = body->tryRead(buffer, 6, 16);
    env.bounded(kj::mv(s.written));
    if (reply.endsWith("0\r\n")) {
      KJ_EXPECT(!read.poll(env.ws));
      env.bounded(env.peer->sendLater("\r\n"));
    }
    KJ_EXPECT(env.bounded(kj::mv(read)) == 5);
    KJ_EXPECT(body.get() == nullptr);
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    env.roundTrip();
  }
  env.fetcher->setObserver(nullptr);
}

// =================================================================================================
// Bodies dropped before their pending reads (the order destroyBodyDuringRead allows)

TLS_LIKE_TRANSPORTS(dropBeforeReadAwaitingTrailers,
    "a body dropped before its read that waits for late trailers, then that read") {
  for (int variant = 0; variant < 3; variant++) {
    KJ_CONTEXT(variant);
    if (variant > 0) {
      // A fresh connection each time.
      auto transport = env.tcp ? test::tcpTransport(env.io) : test::pipeTransport();
      if (env.tls) transport.client = test::tlsLike(kj::mv(transport.client));
      env.fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), env.table, env.settings());
      env.peer = kj::heap<test::Peer>(env.ws, kj::mv(transport.server));
    }
    auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 OK\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Late: 1\r\n");
    auto body = kj::mv(s.response.body);
    char buffer[16];
    KJ_EXPECT(env.read(*body, buffer, 5, 5) == 5);
    env.bounded(kj::mv(s.written));
    auto read = body->tryRead(buffer, 1, 16);
    KJ_EXPECT(!read.poll(env.ws));
    if (variant == 1) env.fetcher = nullptr;
    body = nullptr;  // the body first
    if (variant == 2) env.fetcher = nullptr;
    read = nullptr;  // then its read
    if (env.fetcher.get() != nullptr) {
      KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
      KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.why());
    }
    s.response = {};
    env.settle(2 * kj::MILLISECONDS);
    KJ_EXPECT(env.peerSawEnd());
  }
}

// =================================================================================================
// Bodies and their responses kept across many later exchanges

struct Kept {
  Response response;
  kj::String statusText;   // what statusText must read
  kj::String marker;       // the X-N header's value
};

BOTH_TRANSPORTS(manyBodiesKept,
    "60 responses of every kind held across later exchanges keep their status text, "
    "headers and ended bodies; dropped in any order, between exchanges") {
  kj::Vector<Kept> kept;
  for (unsigned i = 0; i < 60; i++) {
    KJ_CONTEXT(i);
    auto status = kj::str("Status ", i, " ", kj::repeat('x', i % 7));
    auto marker = kj::str("m", i * 7919);
    kj::HttpMethod method = kj::HttpMethod::GET;
    kj::String reply;
    kj::String expectBody;
    switch (i % 6) {
      case 0:
        expectBody = kj::str("body", i);
        reply = kj::str("HTTP/1.1 200 ", status, "\r\nX-N: ", marker, "\r\nContent-Length: ",
            expectBody.size(), "\r\n\r\n", expectBody);
        break;
      case 1:
        expectBody = kj::str("chunk", i, "-", kj::repeat('c', 300));
        reply = kj::str("HTTP/1.1 200 ", status, "\r\nX-N: ", marker,
            "\r\nTransfer-Encoding: chunked\r\n\r\n", kj::hex(expectBody.size()), "\r\n",
            expectBody, "\r\n0\r\nX-Trailer: ", i, "\r\n\r\n");
        break;
      case 2:
        expectBody = kj::str();
        reply = kj::str("HTTP/1.1 204 ", status, "\r\nX-N: ", marker, "\r\n\r\n");
        break;
      case 3:
        method = kj::HttpMethod::HEAD;
        expectBody = kj::str();
        reply = kj::str("HTTP/1.1 200 ", status, "\r\nX-N: ", marker,
            "\r\nContent-Length: 1234\r\n\r\n");
        break;
      case 4:
        expectBody = kj::str();
        reply = kj::str("HTTP/1.1 304 ", status, "\r\nX-N: ", marker,
            "\r\nContent-Length: 99\r\n\r\n");
        break;
      case 5:
        expectBody = kj::str();
        reply = kj::str("HTTP/1.1 200 ", status, "\r\nX-N: ", marker,
            "\r\nContent-Length: 0\r\n\r\n");
        break;
    }
    auto s = env.start(method, kj::str("/k", i), reply);
    if (expectBody.size() > 0) {
      // Read exactly the body (minBytes == its size) so the end comes from the length.
      auto buffer = kj::heapArray<char>(expectBody.size() + 10);
      size_t n = env.read(*s.response.body, buffer.begin(), buffer.size(), buffer.size());
      KJ_EXPECT(kj::heapString(buffer.begin(), n) == expectBody);
    }
    env.bounded(kj::mv(s.written));
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    KJ_EXPECT(KJ_ASSERT_NONNULL(s.response.body->tryGetLength()) == 0);
    kept.add(Kept{kj::mv(s.response), kj::mv(status), kj::mv(marker)});
    // Every fifth, drop an older one (from the middle) between exchanges.
    if (i % 5 == 4 && kept.size() > 3) {
      size_t victim = (i * 31) % (kept.size() - 1);
      kept[victim].response.body = nullptr;
    }
  }
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 60);
  auto check = [&]() {
    for (auto& k: kept) {
      if (k.response.body.get() == nullptr) continue;
      KJ_EXPECT(k.response.statusText == k.statusText, k.response.statusText, k.statusText);
      KJ_EXPECT(header(*k.response.headers, "X-N") == k.marker);
      char c;
      KJ_EXPECT(env.read(*k.response.body, &c, 1, 1) == 0);
      KJ_EXPECT(KJ_ASSERT_NONNULL(k.response.body->tryGetLength()) == 0);
    }
  };
  check();
  for (size_t step = 0; step < kept.size(); step++) {
    size_t victim = (step * 37 + 11) % kept.size();
    kept[victim].response.body = nullptr;
    if (step % 10 == 0) {
      env.roundTrip(kj::str("/between/", step));
      check();
    }
  }
  for (auto& k: kept) k.response.body = nullptr;
  env.roundTrip();
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
}

BOTH_TRANSPORTS(keptAcrossRelease,
    "bodies kept across release() and a new fetcher over the released stream keep "
    "their headers; the old fetcher destroyed first") {
  kj::Vector<Kept> kept;
  for (unsigned i = 0; i < 4; i++) {
    auto status = kj::str("Held ", i);
    auto marker = kj::str("r", i);
    auto s = env.start(kj::HttpMethod::GET, "/", kj::str("HTTP/1.1 200 ", status, "\r\nX-N: ",
        marker, "\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"));
    KJ_EXPECT(env.bounded(s.response.body->readAllText()) == "abc");
    env.bounded(kj::mv(s.written));
    kept.add(Kept{kj::mv(s.response), kj::mv(status), kj::mv(marker)});
  }
  auto second = kj::heap<StreamFetcher>(env.fetcher->release(), env.table, env.settings());
  env.fetcher = nullptr;
  for (int i = 0; i < 3; i++) env.roundTrip(kj::str("/second/", i), second);
  for (auto& k: kept) {
    KJ_EXPECT(k.response.statusText == k.statusText);
    KJ_EXPECT(header(*k.response.headers, "X-N") == k.marker);
    char c;
    KJ_EXPECT(env.read(*k.response.body, &c, 1, 1) == 0);
  }
  kept[2].response.body = nullptr;
  kept[0].response.body = nullptr;
  env.roundTrip("/second/last", second);
  second = nullptr;
  KJ_EXPECT(env.peerSawEnd());
  KJ_EXPECT(kept[3].response.statusText == "Held 3");
  KJ_EXPECT(header(*kept[1].response.headers, "X-N") == "r1");
}

// =================================================================================================
// Bodiless responses with no fetcher left

BOTH_TRANSPORTS(bodilessWithFetcherGone,
    "HEAD, 204, 304 and Content-Length: 0 answers to a fetcher destroyed mid-exchange "
    "come back ended, with their headers, and the connection closes") {
  struct Case {
    kj::HttpMethod method;
    kj::StringPtr reply;
  };
  auto GET = kj::HttpMethod::GET;
  auto HEAD = kj::HttpMethod::HEAD;
  for (auto c: {Case{HEAD, "HTTP/1.1 200 Head\r\nX-N: h\r\nContent-Length: 9\r\n\r\n"},
           Case{GET, "HTTP/1.1 204 Nothing\r\nX-N: n\r\n\r\n"},
           Case{GET, "HTTP/1.1 304 Same\r\nX-N: s\r\nContent-Length: 9\r\n\r\n"},
           Case{GET, "HTTP/1.1 200 Empty\r\nX-N: e\r\nContent-Length: 0\r\n\r\n"}}) {
    auto transport = env.tcp ? test::tcpTransport(env.io) : test::pipeTransport();
    env.fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), env.table, env.settings());
    env.peer = kj::heap<test::Peer>(env.ws, kj::mv(transport.server));
    auto h = env.headers();
    auto req = env.fetcher->request(c.method, "/", h);
    req.body = nullptr;
    env.peer->readRequest();
    env.fetcher = nullptr;
    auto written = env.peer->sendLater(c.reply);
    auto response = env.bounded(kj::mv(req.response));
    env.bounded(kj::mv(written));
    KJ_EXPECT(KJ_ASSERT_NONNULL(response.body->tryGetLength()) == 0);
    char ch;
    KJ_EXPECT(env.read(*response.body, &ch, 1, 1) == 0);
    if (env.tcp) {
      // Ended at once: the server sees the connection go while the response is still held.
      KJ_EXPECT(env.peerSawEnd(), c.reply);
    }
    KJ_EXPECT(c.reply.startsWith(kj::str("HTTP/1.1 ", response.statusCode, " ",
        response.statusText, "\r\n")), response.statusText);
    KJ_EXPECT(contains(c.reply, kj::str("X-N: ", header(*response.headers, "X-N"), "\r\n")));
    response.body = nullptr;
    KJ_EXPECT(env.peerSawEnd());
  }
}

// =================================================================================================
// A response that ends with no fetcher left: every byte is delivered, then the connection closes

kj::String bigBody(size_t size) {
  auto out = kj::heapArray<char>(size);
  for (size_t i = 0; i < size; i++) out[i] = 'a' + (i * 7 + i / 1000) % 26;
  return kj::heapString(out.begin(), out.size());
}

TCP_AND_TLS_LIKE(fetcherGoneLargeBody,
    "a fetcher destroyed mid-exchange: a 300 KiB body read in odd pieces arrives "
    "whole, and the server sees the connection closed while the body is still held") {
  auto content = bigBody(300 * 1024 + 17);
  auto pending = requestThenDropFetcher(env, "/big");
  auto head = kj::str("HTTP/1.1 200 Big\r\nX-N: big\r\nContent-Length: ", content.size(),
      "\r\n\r\n");
  auto all = kj::str(head, content);
  auto written = env.peer->sendLater(all).eagerlyEvaluate(nullptr);
  auto response = env.bounded(kj::mv(pending));
  kj::Vector<char> got;
  auto buffer = kj::heapArray<char>(7000);
  size_t sizes[] = {1, 4096, 999, 7000, 13};
  for (size_t i = 0; got.size() < content.size(); i++) {
    size_t want = kj::min(sizes[i % 5], content.size() - got.size());
    size_t n = env.read(*response.body, buffer.begin(), want, want);
    KJ_ASSERT(n == want, n, want, got.size());
    got.addAll(buffer.begin(), buffer.begin() + n);
  }
  KJ_EXPECT(got.size() == content.size());
  KJ_EXPECT(memcmp(got.begin(), content.begin(), content.size()) == 0);
  env.bounded(kj::mv(written));
  KJ_EXPECT(env.peerSawEnd(), "not closed after its response ended, with no fetcher left");
  char c;
  KJ_EXPECT(env.read(*response.body, &c, 1, 1) == 0);
  KJ_EXPECT(response.statusText == "Big");
  KJ_EXPECT(header(*response.headers, "X-N") == "big");
}

TCP_AND_TLS_LIKE(fetcherGoneChunkedLateTrailers,
    "a fetcher destroyed mid-exchange: a chunked body whose trailers come late is "
    "delivered whole, the connection stays open until they arrive and closes right after") {
  auto pending = requestThenDropFetcher(env, "/chunked");
  auto part = kj::str(kj::repeat('q', 20000));
  auto first = kj::str("HTTP/1.1 200 Chunky\r\nX-N: c\r\nTransfer-Encoding: chunked\r\n\r\n",
      kj::hex(part.size()), "\r\n", part, "\r\n3\r\nend\r\n0\r\n");
  auto written = env.peer->sendLater(first).eagerlyEvaluate(nullptr);
  auto response = env.bounded(kj::mv(pending));
  auto read = response.body->readAllText().eagerlyEvaluate(nullptr);
  env.bounded(kj::mv(written));
  env.settle(10 * kj::MILLISECONDS);
  KJ_EXPECT(!read.poll(env.ws), "the body ended before its trailers");
  KJ_EXPECT(env.peer->readWouldBlock(), "the connection closed before the response ended");
  env.bounded(env.peer->sendLater("X-Trailer: 1\r\n\r\n"));
  auto text = env.bounded(kj::mv(read));
  KJ_EXPECT(text == kj::str(part, "end"), text.size());
  KJ_EXPECT(env.peerSawEnd(), "not closed after its response ended, with no fetcher left");
  KJ_EXPECT(response.statusText == "Chunky");
  KJ_EXPECT(header(*response.headers, "X-N") == "c");
}

TCP_AND_TLS_LIKE(fetcherGoneEndInSameSegment,
    "a fetcher destroyed mid-exchange: head and body in one segment, read with a "
    "minBytes past the end, then after the close: every byte, then 0") {
  auto pending = requestThenDropFetcher(env, "/one");
  auto written = env.peer->sendLater("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
      "4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n");
  auto response = env.bounded(kj::mv(pending));
  env.bounded(kj::mv(written));
  env.settle(5 * kj::MILLISECONDS);
  char buffer[64];
  KJ_EXPECT(env.read(*response.body, buffer, 2, 2) == 2);
  KJ_EXPECT(env.read(*response.body, buffer + 2, 50, 50) == 4);
  KJ_EXPECT(memcmp(buffer, "abcdef", 6) == 0);
  KJ_EXPECT(env.peerSawEnd());
  KJ_EXPECT(env.read(*response.body, buffer, 1, 1) == 0);
}

void bodyHeldFetcherGone(Env& env) {
  auto pending = requestThenDropFetcher(env, "/");
  auto written = env.peer->sendLater(OK_HELLO);
  auto response = env.bounded(kj::mv(pending));
  KJ_EXPECT(env.bounded(response.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  env.limit = 500 * kj::MILLISECONDS;
  KJ_EXPECT(env.peerSawEnd(), "not closed after its response ended, with no fetcher left, "
      "while the body is still held");
  env.limit = 2 * kj::SECONDS;
  response.body = nullptr;
}

TCP_AND_TLS_LIKE(fetcherGoneBodyHeld,
    "a response in flight when the fetcher is destroyed completes normally, and its "
    "connection is then closed while the body is still held") {
  bodyHeldFetcherGone(env);
}

KJ_TEST("over a stream without a descriptor (in-process pipe), a response in flight when the "
    "fetcher is destroyed completes normally, and its connection is then closed while the body "
    "is still held") {
  // With no socket to shut down, the stream's write side is shut down: the peer reads the end.
  Env env(false);
  bodyHeldFetcherGone(env);
}

// =================================================================================================
// 101 through request(): the body is the connection

kj::Promise<Response> requestUpgrade(Env& env) {
  // Sends a bodiless GET asking to switch to a raw protocol, and lets the server read it.
  auto h = env.headers();
  h.set(kj::HttpHeaderId::CONNECTION, "Upgrade");
  h.set(kj::HttpHeaderId::UPGRADE, "raw");
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/up", h);
  req.body = nullptr;
  env.peer->readRequest();
  return kj::mv(req.response);
}

BOTH_TRANSPORTS(upgradeThroughRequestBodyOutlivesFetcher,
    "a 101 to request(): the body carries the new protocol's bytes both ways of the "
    "fetcher's destruction, and dropping it closes the connection") {
  auto upgrade = requestUpgrade(env);
  auto written = env.peer->sendLater("HTTP/1.1 101 Switching\r\nUpgrade: raw\r\n"
      "Connection: Upgrade\r\nX-N: up\r\n\r\nfirst");
  auto response = env.bounded(kj::mv(upgrade));
  env.bounded(kj::mv(written));
  KJ_EXPECT(response.statusCode == 101);
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::UPGRADED, env.why());
  char buffer[16];
  KJ_EXPECT(env.read(*response.body, buffer, 5, 5) == 5);
  KJ_EXPECT(memcmp(buffer, "first", 5) == 0);
  env.fetcher = nullptr;
  auto more = env.peer->sendLater("second");
  KJ_EXPECT(env.read(*response.body, buffer, 6, 6) == 6);
  KJ_EXPECT(memcmp(buffer, "second", 6) == 0);
  env.bounded(kj::mv(more));
  KJ_EXPECT(response.statusText == "Switching");
  KJ_EXPECT(header(*response.headers, "X-N") == "up");
  auto pending = response.body->tryRead(buffer, 1, 1);
  KJ_EXPECT(!pending.poll(env.ws));
  pending = nullptr;
  response.body = nullptr;
  KJ_EXPECT(env.peerSawEnd());
}

BOTH_TRANSPORTS(upgradeBodyDroppedBeforeRead,
    "a 101 to request(), its fetcher gone: the body dropped before its pending read, "
    "then the read") {
  auto upgrade = requestUpgrade(env);
  env.fetcher = nullptr;
  auto written = env.peer->sendLater("HTTP/1.1 101 Switching\r\nUpgrade: raw\r\n"
      "Connection: Upgrade\r\n\r\nab");
  auto response = env.bounded(kj::mv(upgrade));
  env.bounded(kj::mv(written));
  char buffer[16];
  KJ_EXPECT(env.read(*response.body, buffer, 2, 2) == 2);
  auto read = response.body->tryRead(buffer, 1, 16);
  KJ_EXPECT(!read.poll(env.ws));
  response.body = nullptr;
  read = nullptr;
  KJ_EXPECT(env.peerSawEnd());
}

BOTH_TRANSPORTS(webSocketFetcherGoneBefore101,
    "openWebSocket() with the fetcher destroyed before the 101: the WebSocket works, "
    "keeps its headers, and closes its connection when dropped") {
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  auto head = env.peer->readHead();
  auto keyStart = strstr(head.cStr(), "Sec-WebSocket-Key: ");
  KJ_ASSERT(keyStart != nullptr, head);
  keyStart += strlen("Sec-WebSocket-Key: ");
  auto key = kj::heapString(keyStart, strchr(keyStart, '\r') - keyStart);
  env.fetcher = nullptr;
  auto handshake = kj::str("HTTP/1.1 101 Switching Protocols\r\n"
      "Upgrade: websocket\r\nConnection: Upgrade\r\nX-N: w\r\nSec-WebSocket-Accept: ",
      test::webSocketAccept(key), "\r\n\r\n\x81\x02hi");
  auto written = env.peer->sendLater(handshake);  // (a pipe reads from it later)
  auto response = env.bounded(kj::mv(promise));
  env.bounded(kj::mv(written));
  KJ_EXPECT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto message = env.bounded(socket.receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(message.tryGet<kj::String>()) == "hi");
  KJ_EXPECT(header(*response.headers, "X-N") == "w");
  auto pending = socket.receive();
  KJ_EXPECT(!pending.poll(env.ws));
  pending = nullptr;
  response.webSocketOrBody = kj::Own<kj::AsyncInputStream>();
  KJ_EXPECT(env.peerSawEnd());
}

// =================================================================================================
// A refused WebSocket handshake's body kept across later exchanges

BOTH_TRANSPORTS(refusedHandshakeBodyKept,
    "the body of a refused WebSocket handshake, read to its end, keeps its headers "
    "across later exchanges on the kept connection") {
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  env.peer->readHead();
  auto written = env.peer->sendLater("HTTP/1.1 403 Nope\r\nX-N: ws\r\n"
      "Content-Length: 4\r\n\r\ndeny");
  auto response = env.bounded(kj::mv(promise));
  env.bounded(kj::mv(written));
  KJ_EXPECT(response.statusCode == 403);
  auto& body = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>());
  KJ_EXPECT(env.bounded(body.readAllText()) == "deny");
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  for (int i = 0; i < 4; i++) env.roundTrip(kj::str("/after/", i));
  KJ_EXPECT(response.statusText == "Nope");
  KJ_EXPECT(header(*response.headers, "X-N") == "ws");
  response.webSocketOrBody = kj::Own<kj::AsyncInputStream>();
  env.roundTrip();
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 6);
}

// =================================================================================================
// The pool: destroyed mid-exchange, and the stale keep-alive retry (388f913)

using test::ScriptedServer;
using Reply = ScriptedServer::Reply;

struct PoolEnv: public test::LoopEnv {
  using Script = kj::Function<Reply(unsigned connection, unsigned request, kj::StringPtr text)>;
  Script script;
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<ConnectionPool> pool;

  explicit PoolEnv(Script scriptParam, ConnectionPool::Settings settings = {})
      : script(kj::mv(scriptParam)) {
    server = kj::heap<ScriptedServer>(io, "127.0.0.1",
        [this](unsigned c, unsigned r, kj::StringPtr text) { return script(c, r, text); });
    address = server->address();
    pool = kj::heap<ConnectionPool>(timer, table, [this]() { return address->connect(); },
        kj::mv(settings));
  }

  kj::Promise<Response> start(kj::StringPtr url) {
    auto request = pool->request(kj::HttpMethod::GET, url, headers());
    request.body = nullptr;
    return request.response.eagerlyEvaluate(nullptr);
  }
};

Reply reply(kj::StringPtr bytes) {
  Reply r;
  r.bytes = kj::str(bytes);
  return r;
}

KJ_TEST("a pool destroyed mid-exchange: chunked and large bodies held by the caller "
    "arrive whole, and their connections close once each response is over") {
  auto big = bigBody(200 * 1024);
  PoolEnv env([&](unsigned, unsigned, kj::StringPtr text) {
    if (text.startsWith("GET /big ")) {
      return reply(kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", big.size(), "\r\n\r\n", big));
    }
    auto r = reply(kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n4\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n"));
    r.delay = 20 * kj::MILLISECONDS;
    return r;
  });
  auto a = env.start("/big");
  auto b = env.start("/chunked");
  env.waitFor([&]() { return env.server->accepted == 2; });
  auto ra = env.bounded(kj::mv(a));
  env.pool = nullptr;  // with /big's body unread, /chunked's head not yet here
  auto rb = env.bounded(kj::mv(b));
  KJ_EXPECT(env.bounded(rb.body->readAllText()) == "abcdefg");
  auto text = env.bounded(ra.body->readAllText());
  KJ_EXPECT(text.size() == big.size());
  KJ_EXPECT(text == big);
  env.waitFor([&]() { return env.server->open == 0; });
  KJ_EXPECT(env.server->open == 0, env.server->open, "bodies held, responses over");
  char c;
  KJ_EXPECT(env.bounded(ra.body->tryRead(&c, 1, 1)) == 0);
  KJ_EXPECT(env.bounded(rb.body->tryRead(&c, 1, 1)) == 0);
}

KJ_TEST("stale keep-alive: a reused connection the server closes as the request goes "
    "out is retried once on a fresh one (GET), with the answer of the retry") {
  PoolEnv env([](unsigned connection, unsigned request, kj::StringPtr text) {
    if (connection == 0 && request == 1) {
      // Closes without answering: the race of a keep-alive timeout with the next request.
      Reply r;
      r.bytes = kj::str();
      r.closeAfter = true;
      return r;
    }
    auto start = text.findFirst(' ').orDefault(0) + 1;
    auto end = start;
    while (text[end] != ' ') end++;
    auto path = kj::heapString(text.begin() + start, end - start);
    return reply(kj::str("HTTP/1.1 200 OK\r\nX-C: ", connection, "\r\nContent-Length: ",
        path.size(), "\r\n\r\n", path));
  });
  for (int i = 0; i < 3; i++) {
    auto r = env.bounded(env.start(kj::str("/p", i)));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == kj::str("/p", i));
    KJ_EXPECT(header(*r.headers, "X-C") == (i == 0 ? "0" : "1"), i);
  }
  KJ_EXPECT(env.pool->getStats().retries == 1, env.pool->getStats().retries);
  KJ_EXPECT(env.server->accepted == 2, env.server->accepted);
  KJ_EXPECT(env.server->pipelined == 0);
  // A retry that fails as well is reported, not retried again.
  env.script = [](unsigned, unsigned, kj::StringPtr) {
    Reply r;
    r.bytes = kj::str();
    r.closeAfter = true;
    return r;
  };
  auto e = env.failureOf(env.start("/gone"));
  KJ_EXPECT(env.pool->getStats().retries == 2, env.pool->getStats().retries, e);
}

}  // namespace
}  // namespace sockfetch
