// Extreme settings and extreme inputs: every limit of ResponseFramer::Limits,
// StreamFetcher::Settings and ConnectionPool::Settings at 0, 1 and its type's maximum (and
// negative durations), request inputs at their edges (empty and huge urls, RequestCopy's inline
// buffer boundary, expectedBodySize of 0 and UINT64_MAX), response inputs at theirs
// (Content-Length and chunk sizes near 2^64, a head exactly at maxHeaderBytes, interim responses
// at the limit) and the CONNECT tunnel's target and answer-head limits.
//
// Everything is in-process (pipes), every wait bounded.

#include "connector.h"
#include "pool.h"
#include "response-framer.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/pipe-pool-env.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <climits>
#include <stdint.h>
#include <string.h>

namespace sockfetch {
namespace {

using Response = kj::HttpClient::Response;
using test::contains;

constexpr kj::StringPtr OK_HELLO = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj;

// =================================================================================================
// Helpers

kj::Maybe<kj::Exception> feedAll(ResponseFramer& framer, kj::StringPtr bytes) {
  // Feeds `bytes` as fast as space() allows, taking everything passable; returns the failure, if
  // any (thrown by space() or recorded by received()).
  size_t pos = 0;
  kj::byte out[4096];
  while (pos < bytes.size()) {
    kj::ArrayPtr<kj::byte> space;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { space = framer.space(); })) {
      return kj::mv(e);
    }
    size_t n = kj::min(space.size(), bytes.size() - pos);
    memcpy(space.begin(), bytes.begin() + pos, n);
    framer.received(n);
    pos += n;
    KJ_IF_SOME(f, framer.getFailure()) {
      return kj::cp(f);
    }
    while (framer.take(kj::arrayPtr(out, sizeof(out))) > 0) {}
  }
  return nullptr;
}

kj::String headOfSize(size_t total, kj::StringPtr extra = "Content-Length: 2\r\n") {
  // A response head (status line, `extra`, one padding header, blank line) exactly `total` bytes.
  auto prefix = kj::str("HTTP/1.1 200 OK\r\n", extra, "X-Pad: ");
  size_t fixed = prefix.size() + 4;  // "\r\n\r\n"
  KJ_ASSERT(total > fixed);
  auto head = kj::str(prefix, kj::repeat('p', total - fixed), "\r\n\r\n");
  KJ_ASSERT(head.size() == total);
  return head;
}

struct LimitEnv: public test::LoopEnv {
  // A StreamFetcher with the given limits over an in-process pipe, and the scripted server end.
  kj::Own<StreamFetcher> fetcher;
  kj::Own<test::Peer> peer;

  explicit LimitEnv(ResponseFramer::Limits limits = ResponseFramer::Limits()) {
    auto transport = test::pipeTransport();
    StreamFetcher::Settings settings;
    settings.timer = timer;
    settings.limits = limits;
    fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), table, kj::mv(settings));
    peer = kj::heap<test::Peer>(ws, kj::mv(transport.server));
  }

  kj::String exchange(kj::StringPtr reply, kj::StringPtr url = "/") {
    // A GET answered by `reply`: "STATUS body", or "failed: why".
    auto req = fetcher->request(kj::HttpMethod::GET, url, headers());
    req.body = nullptr;
    peer->readRequest();
    auto sent = peer->sendLater(reply).eagerlyEvaluate([](kj::Exception&&) {});
    auto result = bounded(req.response.then([](Response&& r) {
      auto status = r.statusCode;
      return r.body->readAllText().attach(kj::mv(r.body)).then([status](kj::String body) {
        return kj::str(status, " ", body);
      });
    }).catch_([](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
    return result;
  }

  kj::StringPtr why() {
    KJ_IF_SOME(r, fetcher->getCloseReason()) return r;
    return "(not closed)";
  }
};

// =================================================================================================
// ResponseFramer::Limits at their edges

KJ_TEST("edge: Limits::maxHeaderBytes = SIZE_MAX (no limit of its own) accepts a head larger "
    "than the first buffer") {
  // The buffer's cap is maxHeaderBytes + maxChunkLineBytes, which must not wrap around.
  ResponseFramer::Limits limits;
  limits.maxHeaderBytes = SIZE_MAX;
  LimitEnv env(limits);
  auto reply = kj::str(headOfSize(5000), "ok");
  auto outcome = env.exchange(reply);
  KJ_EXPECT(outcome == "200 ok", outcome);
}

KJ_TEST("edge: Limits::maxChunkLineBytes = SIZE_MAX does not lower the header limit: a head of "
    "exactly maxHeaderBytes is accepted") {
  ResponseFramer::Limits limits;
  limits.maxChunkLineBytes = SIZE_MAX;
  ResponseFramer framer(limits);
  framer.start(kj::HttpMethod::GET);
  auto head = headOfSize(limits.maxHeaderBytes);
  KJ_IF_SOME(e, feedAll(framer, kj::str(head, "ok"))) {
    KJ_FAIL_EXPECT("a head exactly at maxHeaderBytes was refused", e.getDescription());
  } else {
    KJ_EXPECT(framer.isComplete());
  }
}

KJ_TEST("edge: a head exactly at maxHeaderBytes is accepted and the connection reused; one byte "
    "more fails clearly") {
  for (size_t limit: {size_t(100), size_t(4096), size_t(5000), size_t(20000)}) {
    KJ_CONTEXT(limit);
    ResponseFramer::Limits limits;
    limits.maxHeaderBytes = limit;
    {
      LimitEnv env(limits);
      auto outcome = env.exchange(kj::str(headOfSize(limit), "ok"));
      KJ_EXPECT(outcome == "200 ok", outcome);
      KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
      auto again = env.exchange(OK_HELLO);
      KJ_EXPECT(again == "200 hello", again);
    }
    {
      LimitEnv env(limits);
      auto outcome = env.exchange(kj::str(headOfSize(limit + 1), "ok"));
      KJ_EXPECT(contains(outcome,
          kj::str("the server's response is over a limit: its header block exceeds "
              "ResponseFramer::Limits::maxHeaderBytes (", limit, ")")),
          outcome);
      // The framer's own words, not wrapped as a failed read of the connection.
      KJ_EXPECT(!contains(outcome, "the connection failed"), outcome);
      KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
    }
  }
}

KJ_TEST("edge: maxChunkLineBytes = 0 still lets a head exactly at maxHeaderBytes through (the "
    "buffer grows to the header limit itself)") {
  ResponseFramer::Limits limits;
  limits.maxHeaderBytes = 5000;
  limits.maxChunkLineBytes = 0;
  LimitEnv env(limits);
  auto outcome = env.exchange(kj::str(headOfSize(5000), "ok"));
  KJ_EXPECT(outcome == "200 ok", outcome);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
}

KJ_TEST("edge: maxHeaderBytes = 0 and 1 refuse every response, saying so") {
  for (size_t limit: {size_t(0), size_t(1)}) {
    ResponseFramer::Limits limits;
    limits.maxHeaderBytes = limit;
    LimitEnv env(limits);
    auto outcome = env.exchange(OK_HELLO);
    KJ_EXPECT(contains(outcome,
        kj::str("Limits::maxHeaderBytes (", limit, ")")), outcome);
  }
}

KJ_TEST("edge: maxHeaderBytes above what kj-http reads is cut to 120 KiB: a larger head fails "
    "with the framer's own error, which names the limit, never kj's about request headers") {
  // kj-http 0.9.2 refuses a header block of 128 KiB or more (its MAX_BUFFER), whatever the limit.
  ResponseFramer::Limits limits;
  limits.maxHeaderBytes = 1 << 20;
  LimitEnv env(limits);
  auto outcome = env.exchange(kj::str(headOfSize(200 * 1024), "ok"));
  KJ_EXPECT(contains(outcome,
          kj::str("Limits::maxHeaderBytes (", 120 * 1024, ")")) &&
      !contains(outcome, "request headers"), outcome);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
}

KJ_TEST("edge: a head just under kj-http's 128 KiB passes with maxHeaderBytes = 1 MiB") {
  ResponseFramer::Limits limits;
  limits.maxHeaderBytes = 1 << 20;
  LimitEnv env(limits);
  auto outcome = env.exchange(kj::str(headOfSize(100 * 1024), "ok"));
  KJ_EXPECT(outcome == "200 ok", outcome);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
}

KJ_TEST("edge: interim responses exactly at maxInterimResponses are skipped; one more fails") {
  for (size_t limit: {size_t(0), size_t(1), size_t(3)}) {
    KJ_CONTEXT(limit);
    ResponseFramer::Limits limits;
    limits.maxInterimResponses = limit;
    auto interim = [](size_t n) {
      kj::Vector<char> out;
      for (size_t i = 0; i < n; i++) {
        out.addAll(i % 2 ? "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"_kj
                         : "HTTP/1.1 100 Continue\r\n\r\n"_kj);
      }
      return kj::heapString(out.begin(), out.size());
    };
    {
      LimitEnv env(limits);
      auto outcome = env.exchange(kj::str(interim(limit), OK_HELLO));
      KJ_EXPECT(outcome == "200 hello", outcome);
      KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
    }
    {
      LimitEnv env(limits);
      auto outcome = env.exchange(kj::str(interim(limit + 1), OK_HELLO));
      KJ_EXPECT(contains(outcome,
          kj::str("Limits::maxInterimResponses (", limit, ")")),
          outcome);
      KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
    }
  }
}

KJ_TEST("edge: maxInterimResponses = SIZE_MAX never overflows its count") {
  ResponseFramer::Limits limits;
  limits.maxInterimResponses = SIZE_MAX;
  ResponseFramer framer(limits);
  framer.start(kj::HttpMethod::GET);
  kj::Vector<char> text;
  for (int i = 0; i < 2000; i++) text.addAll("HTTP/1.1 100 Continue\r\n\r\n"_kj);
  text.addAll("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"_kj);
  KJ_EXPECT(feedAll(framer, kj::heapString(text.begin(), text.size())) == nullptr);
  KJ_EXPECT(framer.isComplete());
}

KJ_TEST("edge: maxTrailerBytes = 0 accepts an empty trailer section and refuses any trailer") {
  ResponseFramer::Limits limits;
  limits.maxTrailerBytes = 0;
  {
    LimitEnv env(limits);
    auto outcome = env.exchange(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n");
    KJ_EXPECT(outcome == "200 ok", outcome);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
  }
  {
    LimitEnv env(limits);
    auto outcome = env.exchange(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX: y\r\n\r\n");
    KJ_EXPECT(contains(outcome, "Limits::maxTrailerBytes"), outcome);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  }
}

KJ_TEST("edge: maxChunkLineBytes = 0 refuses every chunked body, saying so") {
  ResponseFramer::Limits limits;
  limits.maxChunkLineBytes = 0;
  LimitEnv env(limits);
  auto outcome = env.exchange(
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n");
  KJ_EXPECT(contains(outcome, "Limits::maxChunkLineBytes"), outcome);
}

// =================================================================================================
// Response inputs at their edges

KJ_TEST("edge: Content-Length of UINT64_MAX, 2^63 and 2^64 fail clearly; the connection is "
    "dropped") {
  for (auto value: {"18446744073709551615"_kj, "9223372036854775808"_kj,
                    "18446744073709551616"_kj}) {
    KJ_CONTEXT(value);
    LimitEnv env;
    auto outcome = env.exchange(kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", value,
        "\r\n\r\nhello"));
    KJ_EXPECT(outcome.startsWith("failed: "), outcome);
    KJ_EXPECT(contains(outcome, "Content-Length"), outcome);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  }
}

KJ_TEST("edge: a Content-Length of 10^18 - 1 that the server cuts short fails as truncated") {
  LimitEnv env;
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 999999999999999999\r\n\r\nhello")
      .wait(env.ws);
  auto response = env.bounded(kj::mv(req.response));
  KJ_EXPECT(KJ_ASSERT_NONNULL(response.body->tryGetLength()) == 999999999999999999ull);
  char buffer[16];
  size_t n = env.bounded(response.body->tryRead(buffer, 5, sizeof(buffer)));
  KJ_EXPECT(n == 5);
  env.peer->close();
  auto e = env.failureOf(response.body->tryRead(buffer, 1, sizeof(buffer)));
  KJ_EXPECT(contains(e.getDescription(), "before the end of the response body") ||
      contains(e.getDescription(), "premature"), e.getDescription());
}

KJ_TEST("edge: chunk sizes at 2^60 - 1 pass, at 2^60 and near 2^64 fail clearly") {
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    KJ_EXPECT(feedAll(framer, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        "fffffffffffffff\r\nabc") == nullptr);
    KJ_EXPECT(!framer.isComplete());
  }
  for (auto size: {"1000000000000000"_kj, "ffffffffffffffff"_kj, "10000000000000000"_kj,
                   "fffffffffffffffffffffffffffffff"_kj}) {
    KJ_CONTEXT(size);
    LimitEnv env;
    auto outcome = env.exchange(kj::str(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", size, "\r\nabc"));
    KJ_EXPECT(contains(outcome, "chunk size too large"), outcome);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  }
}

KJ_TEST("edge: leading zeros in a chunk size (20 digits) are read as the value") {
  LimitEnv env;
  auto outcome = env.exchange("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
      "00000000000000000002\r\nok\r\n0000000000000000000000\r\n\r\n");
  KJ_EXPECT(outcome == "200 ok", outcome);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
}

KJ_TEST("edge: a chunked body whose first chunk is the last (0) is empty and reusable") {
  LimitEnv env;
  auto outcome = env.exchange("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
  KJ_EXPECT(outcome == "200 ", outcome);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
  auto again = env.exchange(OK_HELLO);
  KJ_EXPECT(again == "200 hello", again);
}

// =================================================================================================
// StreamFetcher request inputs at their edges

KJ_TEST("edge: StreamFetcher refuses an empty url at once, writing nothing (it would make the "
    "request line invalid), and sends a 1 MiB url as given") {
  LimitEnv env;
  KJ_EXPECT_THROW_MESSAGE("the request url is empty",
      env.fetcher->request(kj::HttpMethod::GET, "", env.headers()));
  KJ_EXPECT(env.peer->readWouldBlock(), "the refused request was written");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
  auto url = kj::str("/", kj::repeat('u', 1 << 20));
  auto outcome = env.exchange(OK_HELLO, url);
  KJ_EXPECT(outcome == "200 hello", outcome);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
}

KJ_TEST("edge: StreamFetcher POST with expectedBodySize 0 is complete at once and reusable") {
  LimitEnv env;
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(0));
  req.body = nullptr;
  auto head = env.peer->readRequest();
  KJ_EXPECT(contains(head, "Content-Length: 0\r\n"), head);
  auto sent = env.peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(sent));
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
}

KJ_TEST("edge: StreamFetcher POST declaring UINT64_MAX bytes, cut short: the response fails, "
    "nothing reused") {
  LimitEnv env;
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), UINT64_MAX);
  auto head = env.peer->readHead();
  KJ_EXPECT(contains(head, "Content-Length: 18446744073709551615\r\n"), head);
  auto write = req.body->write("hello", 5);
  KJ_EXPECT(env.peer->readExactly(5) == "hello");
  env.bounded(kj::mv(write));
  req.body = nullptr;
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(contains(e.getDescription(), "5 of its 18446744073709551615 bytes"),
      e.getDescription());
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
}

KJ_TEST("edge: StreamFetcher body longer than declared: the extra write is refused, nothing of "
    "it reaches the wire, the exchange completes") {
  LimitEnv env;
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(3));
  env.peer->readHead();
  auto write = req.body->write("abc", 3);
  KJ_EXPECT(env.peer->readExactly(3) == "abc");
  env.bounded(kj::mv(write));
  bool refused = false;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { env.bounded(req.body->write("d", 1)); })) {
    refused = true;
    (void)e;
  }
  KJ_EXPECT(refused);
  req.body = nullptr;
  KJ_EXPECT(env.peer->readWouldBlock());
  auto sent = env.peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(sent));
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
}

// =================================================================================================
// ConnectionPool settings and request inputs

struct PeerPoolEnv: public test::LoopEnv {
  // A ConnectionPool whose connections are pipes; each server end is a scripted Peer.
  kj::Vector<kj::Own<test::Peer>> peers;
  kj::Own<ConnectionPool> pool;

  explicit PeerPoolEnv(ConnectionPool::Settings settings) {
    pool = kj::heap<ConnectionPool>(timer, table, [this]() {
      auto t = test::pipeTransport();
      peers.add(kj::heap<test::Peer>(ws, kj::mv(t.server)));
      return kj::Promise<kj::Own<kj::AsyncIoStream>>(kj::mv(t.client));
    }, kj::mv(settings));
  }
};

KJ_TEST("edge: RequestCopy at its inline boundary (255, 256, 257 bytes), one-byte, and 100 KiB "
    "urls with many, empty and huge headers: a request that waited is sent exactly as given") {
  auto settings = test::limits(1);
  PeerPoolEnv env(settings);
  kj::HttpHeaderTable::Builder builder;
  auto custom = builder.add("X-Registered");
  auto table = builder.build();

  struct Case {
    kj::String url;
    kj::Own<kj::HttpHeaders> headers;
  };
  kj::Vector<Case> cases;
  for (size_t n: {size_t(1), size_t(254), size_t(255), size_t(256), size_t(100 * 1024)}) {
    // Without headers the copy holds the url and its NUL: 255 fills the inline buffer exactly.
    auto url = kj::str("/", kj::repeat('u', n - 1));
    cases.add(Case{kj::mv(url), kj::heap<kj::HttpHeaders>(*table)});
  }
  {
    auto h = kj::heap<kj::HttpHeaders>(*table);
    h->set(custom, "registered");
    h->add("X-Empty", "");
    for (int i = 0; i < 300; i++) h->add(kj::str("X-H", i), kj::str("v", i));
    h->add("X-Huge", kj::str(kj::repeat('h', 64 * 1024)));
    h->add("X-Empty", "");
    cases.add(Case{kj::str("/many"), kj::mv(h)});
  }

  // A first request holds the only connection, so each case waits and is sent from its copy.
  for (auto& c: cases) {
    KJ_CONTEXT(c.url.size());
    auto first = env.pool->request(kj::HttpMethod::GET, "/hold", env.headers());
    first.body = nullptr;
    auto firstResponse = first.response.eagerlyEvaluate(nullptr);
    env.waitFor([&]() { return env.peers.size() == 1; });
    KJ_ASSERT(env.peers.size() == 1);
    auto& peer = *env.peers[0];
    peer.readRequest();
    auto second = env.pool->request(kj::HttpMethod::GET, c.url, *c.headers);
    second.body = nullptr;
    auto secondResponse = second.response.eagerlyEvaluate(nullptr);
    c.headers = nullptr;  // the caller's headers need only last until request() returns
    auto sent = peer.sendLater(OK_HELLO);
    auto r = env.bounded(kj::mv(firstResponse));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    r.body = nullptr;
    env.bounded(kj::mv(sent));
    auto head = peer.readRequest();
    KJ_EXPECT(head.startsWith(kj::str("GET ", c.url, " HTTP/1.1\r\n")),
        head.slice(0, kj::min(head.size(), size_t(40))));
    if (c.url == "/many") {
      KJ_EXPECT(contains(head, "\r\nX-Registered: registered\r\n"));
      KJ_EXPECT(contains(head, "\r\nX-H0: v0\r\n") && contains(head, "\r\nX-H299: v299\r\n"));
      KJ_EXPECT(contains(head, kj::str("\r\nX-Huge: ", kj::repeat('h', 64 * 1024), "\r\n")));
      size_t empties = 0;
      for (const char* p = head.cStr(); (p = strstr(p, "\r\nX-Empty: \r\n")) != nullptr; p++) {
        empties++;
      }
      KJ_EXPECT(empties == 2, empties);
    }
    auto sent2 = peer.sendLater(OK_HELLO);
    auto r2 = env.bounded(kj::mv(secondResponse));
    KJ_EXPECT(env.bounded(r2.body->readAllText()) == "hello");
    env.bounded(kj::mv(sent2));
  }
  KJ_EXPECT(env.peers.size() == 1);
}

KJ_TEST("edge: maxReplayBodyBytes = SIZE_MAX with a body declared UINT64_MAX long: the buffer "
    "grows with what is written, and a body cut short fails clearly") {
  // The declared size alone must not drive an allocation: nothing is reserved up front.
  auto settings = test::limits(1);
  settings.maxReplayBodyBytes = SIZE_MAX;
  test::PipePoolEnv env(settings);
  kj::HttpHeaders headers(env.table);
  auto req = env.pool->request(kj::HttpMethod::POST, "/upload", headers, UINT64_MAX);
  writeAll(*req.body, "hello"_kj.asBytes()).wait(env.ws);
  req.body = nullptr;
  auto outcome = test::outcomeOf(env, kj::mv(req.response));
  KJ_EXPECT(contains(outcome, "dropped after 5 of its 18446744073709551615 bytes"), outcome);
  KJ_EXPECT(env.upstream.seen.size() == 0, "part of a body was sent", env.upstream.seen.size());
  env.checkCounted("after the cut body");
}

KJ_TEST("edge: maxReplayBodyBytes = 0: a POST with expectedBodySize 0 is sent; a longer body "
    "streams") {
  auto settings = test::limits(1);
  settings.maxReplayBodyBytes = 0;
  PeerPoolEnv env(settings);
  {
    auto req = env.pool->request(kj::HttpMethod::POST, "/empty", env.headers(), uint64_t(0));
    req.body = nullptr;
    auto response = req.response.eagerlyEvaluate(nullptr);
    env.waitFor([&]() { return env.peers.size() == 1; });
    auto head = env.peers[0]->readRequest();
    KJ_EXPECT(contains(head, "Content-Length: 0\r\n"), head);
    auto sent = env.peers[0]->sendLater(OK_HELLO);
    auto r = env.bounded(kj::mv(response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    env.bounded(kj::mv(sent));
  }
  {
    auto req = env.pool->request(kj::HttpMethod::POST, "/one", env.headers(), uint64_t(1));
    auto response = req.response.eagerlyEvaluate(nullptr);
    auto write = req.body->write("x", 1).attach(kj::mv(req.body)).eagerlyEvaluate(nullptr);
    auto got = env.peers[0]->readRequest();
    env.bounded(kj::mv(write));
    KJ_EXPECT(got.endsWith("\r\n\r\nx"), got);
    auto sent = env.peers[0]->sendLater(OK_HELLO);
    auto r = env.bounded(kj::mv(response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    env.bounded(kj::mv(sent));
  }
  KJ_EXPECT(env.peers.size() == 1);
}

KJ_TEST("edge: a buffered body longer or shorter than declared fails clearly, nothing sent") {
  auto settings = test::limits(1);
  test::PipePoolEnv env(settings);
  kj::HttpHeaders headers(env.table);
  {
    auto req = env.pool->request(kj::HttpMethod::PUT, "/long", headers, uint64_t(3));
    auto response = req.response.eagerlyEvaluate(nullptr);
    KJ_EXPECT_THROW_MESSAGE("longer than the declared 3 bytes",
        req.body->write("abcd", 4).wait(env.ws));
    req.body = nullptr;
    auto outcome = test::outcomeOf(env, kj::mv(response));
    KJ_EXPECT(contains(outcome, "dropped after 0 of its 3 bytes"), outcome);
  }
  {
    auto req = env.pool->request(kj::HttpMethod::PUT, "/short", headers, uint64_t(3));
    auto response = req.response.eagerlyEvaluate(nullptr);
    req.body->write("ab", 2).wait(env.ws);
    req.body = nullptr;
    auto outcome = test::outcomeOf(env, kj::mv(response));
    KJ_EXPECT(contains(outcome, "dropped after 2 of its 3 bytes, so nothing was sent"), outcome);
  }
  KJ_EXPECT(env.upstream.connects == 0);
}

KJ_TEST("edge: maxIdleConnections = 0, maxRequestsPerConnection = 1 and neverReuse: every "
    "connection is closed after its request, counted") {
  for (int which = 0; which < 3; which++) {
    KJ_CONTEXT(which);
    auto settings = test::limits(2);
    if (which == 0) settings.maxIdleConnections = 0;
    if (which == 1) settings.maxRequestsPerConnection = 1;
    if (which == 2) settings.neverReuse = true;
    test::PipePoolEnv env(settings);
    for (int i = 0; i < 3; i++) {
      auto body = env.get("/x");
      KJ_EXPECT(test::connectionOf(body) == unsigned(i), body);
    }
    env.checkCounted("after");
    KJ_EXPECT(env.pool->getOpenCount() == 0);
  }
}

KJ_TEST("edge: maxWaiting = 0 refuses at once when all connections are busy; UINT_MAX limits "
    "behave as unlimited") {
  {
    auto settings = test::limits(1);
    settings.maxWaiting = 0;
    test::PipePoolEnv env(settings);
    auto a = env.bounded(env.start("/a"));
    auto outcome = test::outcomeOf(env, env.start("/b"));
    KJ_EXPECT(contains(outcome, "raise maxConnections or maxWaiting"), outcome);
    KJ_EXPECT(env.read(kj::mv(a)) == "0 /a");
  }
  {
    auto settings = test::limits(1);
    settings.maxConnections = UINT_MAX;
    settings.maxIdleConnections = UINT_MAX;
    settings.maxWaiting = UINT_MAX;
    settings.maxRequestsPerConnection = UINT64_MAX;
    test::PipePoolEnv env(settings);
    auto a = env.bounded(env.start("/a"));
    auto b = env.bounded(env.start("/b"));
    KJ_EXPECT(env.read(kj::mv(a)) == "0 /a");
    KJ_EXPECT(env.read(kj::mv(b)) == "1 /b");
    KJ_EXPECT(env.get("/c") == "1 /c");
    env.checkCounted("unlimited");
  }
}

KJ_TEST("edge: idleTimeout = 0 closes a connection as soon as the clock moves; kj::minValue is "
    "refused") {
  {
    auto settings = test::limits(1);
    settings.idleTimeout = 0 * kj::SECONDS;
    test::PipePoolEnv env(settings);
    KJ_EXPECT(env.get("/a") == "0 /a");
    env.advance(1 * kj::NANOSECONDS);
    KJ_EXPECT(env.pool->getIdleCount() == 0);
    KJ_EXPECT(env.get("/b") == "1 /b");
    env.checkCounted("zero");
  }
  {
    auto settings = test::limits(1);
    settings.idleTimeout = kj::minValue;
    KJ_EXPECT_THROW_MESSAGE("timeouts cannot be negative", test::PipePoolEnv env(settings));
  }
}

KJ_TEST("edge: a negative timeout is refused when the pool is made, saying what to use instead") {
  for (int which = 0; which < 3; which++) {
    KJ_CONTEXT(which);
    auto settings = test::limits(1);
    auto& timeout = which == 0 ? settings.connectTimeout
        : which == 1 ? settings.waitTimeout : settings.idleTimeout;
    timeout = -5 * kj::SECONDS;
    KJ_EXPECT_THROW_MESSAGE(
        "timeouts cannot be negative; use 0 for at once, kj::maxValue for never",
        test::PipePoolEnv env(settings));
  }
}

// =================================================================================================
// tunnelConnector

using TunnelEnv = test::PipeProxyEnv;

KJ_TEST("edge: tunnelConnector refuses at once a target with CR LF, a space or another control "
    "character, which would add headers or a request to the CONNECT") {
  TunnelEnv env;
  for (kj::StringPtr target: {
           "origin.test:443 HTTP/1.1\r\nX-Injected: yes\r\n\r\nGET / HTTP/1.1"_kj,
           "origin.test:443\r\nX-Injected: yes"_kj, "origin test:443"_kj,
           "origin.test:443\x01"_kj, "origin.test:443\x7f"_kj}) {
    KJ_EXPECT_THROW_MESSAGE("without spaces or control characters",
        tunnelConnector(env.toProxy(), target));
  }
  KJ_EXPECT(env.calls == 0 && env.proxies.size() == 0);
}

KJ_TEST("edge: tunnelConnector refuses an empty target at once, saying it needs host:port") {
  TunnelEnv env;
  KJ_EXPECT_THROW_MESSAGE("tunnelConnector needs a target, as host:port",
      tunnelConnector(env.toProxy(), ""));
  KJ_EXPECT(env.calls == 0);
}

KJ_TEST("edge: tunnelConnector with a 64 KiB target sends it whole; the proxy's refusal names it") {
  TunnelEnv env;
  auto target = kj::str(kj::repeat('t', 64 * 1024), ":443");
  auto connector = tunnelConnector(env.toProxy(), target);
  auto promise = connector().eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return env.proxies.size() == 1; });
  KJ_ASSERT(env.proxies.size() == 1);
  auto head = env.proxies[0]->readHead();
  KJ_EXPECT(head.startsWith(kj::str("CONNECT ", target, " HTTP/1.1\r\n")));
  auto sent = env.proxies[0]->sendLater("HTTP/1.1 403 Forbidden\r\n\r\n");
  auto e = env.failureOf(kj::mv(promise));
  KJ_EXPECT(contains(e.getDescription(), "403 Forbidden"), e.getDescription().slice(0, 100));
}

KJ_TEST("edge: a proxy answer head of exactly 16 KiB opens the tunnel, with the bytes after it "
    "kept; an endless head fails clearly and bounded") {
  {
    TunnelEnv env;
    auto connector = tunnelConnector(env.toProxy(), "origin.test:80");
    auto promise = connector().eagerlyEvaluate(nullptr);
    env.waitFor([&]() { return env.proxies.size() == 1; });
    env.proxies[0]->readHead();
    auto prefix = "HTTP/1.1 200 Connection established\r\nX-Pad: "_kj;
    auto answer = kj::str(prefix, kj::repeat('p', 16 * 1024 - prefix.size() - 4), "\r\n\r\n",
        "AFTER");
    KJ_EXPECT(answer.size() == 16 * 1024 + 5);
    auto sent = env.proxies[0]->sendLater(answer);
    auto stream = env.bounded(kj::mv(promise));
    char buffer[5];
    env.bounded(stream->read(buffer, 5));
    KJ_EXPECT(kj::heapString(buffer, 5) == "AFTER");
    env.bounded(kj::mv(sent));
  }
  {
    TunnelEnv env;
    auto connector = tunnelConnector(env.toProxy(), "origin.test:80");
    auto promise = connector().eagerlyEvaluate(nullptr);
    env.waitFor([&]() { return env.proxies.size() == 1; });
    env.proxies[0]->readHead();
    auto answer = kj::str("HTTP/1.1 200 OK\r\nX-Pad: ", kj::repeat('p', 1 << 20));
    auto sent = env.proxies[0]->sendLater(answer).eagerlyEvaluate([](kj::Exception&&) {});
    auto e = env.failureOf(kj::mv(promise));
    KJ_EXPECT(contains(e.getDescription(), "is longer than 16384 bytes"), e.getDescription());
  }
}

KJ_TEST("edge: 16 interim answers to CONNECT are skipped, the 17th fails clearly") {
  for (unsigned n: {16u, 17u}) {
    KJ_CONTEXT(n);
    TunnelEnv env;
    auto connector = tunnelConnector(env.toProxy(), "origin.test:80");
    auto promise = connector().eagerlyEvaluate(nullptr);
    env.waitFor([&]() { return env.proxies.size() == 1; });
    env.proxies[0]->readHead();
    kj::Vector<char> answer;
    for (unsigned i = 0; i < n; i++) answer.addAll("HTTP/1.1 100 Continue\r\n\r\n"_kj);
    answer.addAll("HTTP/1.1 200 OK\r\n\r\n"_kj);
    auto text = kj::heapString(answer.begin(), answer.size());
    auto sent = env.proxies[0]->sendLater(text).eagerlyEvaluate([](kj::Exception&&) {});
    if (n == 16) {
      env.bounded(kj::mv(promise));
    } else {
      auto e = env.failureOf(kj::mv(promise));
      KJ_EXPECT(contains(e.getDescription(), "more than 16 interim"), e.getDescription());
    }
  }
}

}  // namespace
}  // namespace sockfetch
