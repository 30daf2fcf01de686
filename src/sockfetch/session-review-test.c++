// A second review of the session's fixes (041c64a..38c98a4): the pool's streaming request bodies
// (writes given up on before, as and after a connection takes the request; bodies and response
// promises dropped at every point; concurrent and zero-length writes), the CONNECT answer's end
// searched from where the last search stopped, and the framer's trailer, version and
// leading-blank changes, each fed split at every byte.

#include "connector.h"
#include "pool.h"
#include "response-framer.h"
#include "stream-fetcher.h"

#include <sockfetch/fetcher-env.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::contains;
using test::ScriptedServer;
using Response = kj::HttpClient::Response;

constexpr size_t MAX_REPLAY = 1024;  // the pool's maxReplayBodyBytes

// =================================================================================================
// A pool of one connection whose connections arrive only when the test says (arrive()), in front
// of a loopback server that records every complete request it reads.

struct GatedEnv: public test::LoopEnv {
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  kj::Vector<kj::String> seen;  // every complete request the server read
  kj::Vector<kj::Own<kj::PromiseFulfiller<kj::Own<kj::AsyncIoStream>>>> gates;
  size_t arrived = 0;
  kj::Own<ConnectionPool> pool;

  GatedEnv() {
    limit = 5 * kj::SECONDS;
    server = kj::heap<ScriptedServer>(io, "127.0.0.1",
        [this](unsigned, unsigned, kj::StringPtr text) {
      seen.add(kj::str(text));
      return test::ok(kj::str("echo:", test::pathOf(text)));
    });
    address = server->address();
    ConnectionPool::Settings settings;
    settings.maxConnections = 1;
    settings.maxReplayBodyBytes = MAX_REPLAY;
    pool = kj::heap<ConnectionPool>(timer, table,
        [this]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      auto paf = kj::newPromiseAndFulfiller<kj::Own<kj::AsyncIoStream>>();
      gates.add(kj::mv(paf.fulfiller));
      return kj::mv(paf.promise);
    }, kj::mv(settings));
  }

  void arrive() {
    // The connection the pool asked for arrives (connected beforehand: only the hand-over is left).
    KJ_ASSERT(arrived < gates.size(), "the pool asked for no connection");
    auto stream = bounded(address->connect());
    gates[arrived++]->fulfill(kj::mv(stream));
  }

  kj::Own<test::Peer> arriveAsPeer() {
    // The connection the pool asked for arrives from a peer the test drives (not the server).
    KJ_ASSERT(arrived < gates.size(), "the pool asked for no connection");
    auto t = test::tcpTransport(io);
    gates[arrived++]->fulfill(kj::mv(t.client));
    return kj::heap<test::Peer>(ws, kj::mv(t.server));
  }

  void turn() { kj::evalLater([]() {}).wait(ws); }
  void turns(unsigned n) { for (unsigned i = 0; i < n; i++) turn(); }

  bool sawComplete(kj::StringPtr path) {
    for (auto& t: seen) {
      if (test::pathOf(t) == path) return true;
    }
    return false;
  }
};

kj::Promise<kj::Maybe<kj::String>> outcomeOf(kj::Promise<Response> response) {
  // The response body, or null if the request failed.
  return response.then([](Response&& r) {
    auto& body = *r.body;
    return body.readAllText().attach(kj::mv(r.body)).then(
        [](kj::String&& text) -> kj::Maybe<kj::String> { return kj::mv(text); });
  }, [](kj::Exception&&) -> kj::Maybe<kj::String> { return nullptr; });
}

enum class WriteKind { PLAIN, GATHERED };

kj::String describe(const kj::Maybe<kj::String>& response) {
  KJ_IF_SOME(text, response) {
    return kj::str("'", text, "'");
  }
  return kj::str("failed");
}

struct GivenUp {
  bool wroteFirst = false;  // the write finished before it was given up: the case tests nothing
  kj::Maybe<kj::String> response;
  bool serverSawComplete = false;
  kj::String seen;
};

GivenUp giveUpWriteThenDrop(kj::Maybe<uint64_t> size, WriteKind kind, unsigned turnsAfterArrival,
    bool giveUpBeforeArrival) {
  // POST /upload through a pool whose connection has not come yet: one write to the body, which
  // waits for the connection. The write is given up on (its promise dropped) before the
  // connection arrives or `turnsAfterArrival` turns after it; the body is dropped once the
  // connection has surely taken the request.
  GatedEnv env;
  GivenUp result;
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h, size);
  auto outcome = outcomeOf(kj::mv(request.response)).eagerlyEvaluate(nullptr);
  auto data = kj::str(kj::repeat('u', 100));
  auto half = data.size() / 2;
  kj::ArrayPtr<const kj::byte> pieces[] = {
    data.asBytes().slice(0, half), data.asBytes().slice(half, data.size())};
  bool wrote = false;
  kj::Promise<void> write = nullptr;
  if (kind == WriteKind::PLAIN) {
    write = request.body->write(data.begin(), data.size());
  } else {
    write = request.body->write(kj::arrayPtr(pieces, 2));
  }
  write = write.then([&wrote]() { wrote = true; }).eagerlyEvaluate(nullptr);
  env.turns(3);
  KJ_ASSERT(!wrote, "the write finished without a connection");
  KJ_ASSERT(env.gates.size() == 1, env.gates.size());
  if (giveUpBeforeArrival) {
    write = nullptr;
    env.arrive();
  } else {
    env.arrive();
    env.turns(turnsAfterArrival);
    write = nullptr;
  }
  env.turns(20);  // the connection takes the request (not the case under test if it did not)
  request.body = nullptr;
  result.wroteFirst = wrote;
  result.response = env.bounded(kj::mv(outcome));
  env.settle();
  result.serverSawComplete = env.sawComplete("/upload");
  kj::Vector<kj::String> shown;
  for (auto& t: env.seen) {
    // Its request line and its body, escaped.
    auto line = kj::heapString(t.begin(), t.findFirst('\r').orDefault(t.size()));
    auto bodyAt = strstr(t.cStr(), "\r\n\r\n");
    kj::Vector<char> body;
    for (const char* c = bodyAt == nullptr ? "" : bodyAt + 4; *c != '\0'; c++) {
      if (*c == '\r') body.addAll("\\r"_kj);
      else if (*c == '\n') body.addAll("\\n"_kj);
      else body.add(*c);
    }
    shown.add(kj::str(line, " with body \"", body.asPtr(), "\""));
  }
  result.seen = kj::strArray(shown, " | ");
  return result;
}

GivenUp giveUpWriteDuringRetry() {
  // The pool's one idle connection is found closed by its server when POST /upload (chunked,
  // streamed) takes it (fetcher.request() throws inside request()), so the request is sent again
  // on a new connection, which the test holds back. Meanwhile the caller's write waits and is
  // given up on; the body is dropped once the new connection has taken the request.
  GatedEnv env;
  GivenUp result;
  {
    auto h = env.headers();
    auto warm = env.pool->request(kj::HttpMethod::GET, "/warm", h);
    warm.body = nullptr;
    auto response = warm.response.eagerlyEvaluate(nullptr);
    env.turns(3);
    auto peer = env.arriveAsPeer();
    peer->readRequest();
    peer->send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    auto r = env.bounded(kj::mv(response));
    KJ_ASSERT(env.bounded(r.body->readAllText()) == "ok");
    r.body = nullptr;
    env.turns(3);
    KJ_ASSERT(env.pool->getIdleCount() == 1, env.pool->getIdleCount());
    peer->close();  // the server closes the idle connection; the pool has not noticed yet
  }
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h);
  KJ_ASSERT(env.pool->getStats().droppedPeerClosedIdle == 1,
      "the lost connection was not found at request time",
      env.pool->getStats().droppedPeerClosedIdle);
  auto outcome = outcomeOf(kj::mv(request.response)).eagerlyEvaluate(nullptr);
  auto data = kj::str("abc");
  bool wrote = false;
  auto write = request.body->write(data.begin(), data.size())
      .then([&wrote]() { wrote = true; }).eagerlyEvaluate(nullptr);
  env.turns(3);
  write = nullptr;  // given up on while the retry waits for its connection
  env.arrive();
  env.turns(20);
  request.body = nullptr;
  result.wroteFirst = wrote;
  result.response = env.bounded(kj::mv(outcome));
  env.settle();
  result.serverSawComplete = env.sawComplete("/upload");
  result.seen = kj::strArray(env.seen, " | ");
  return result;
}

KJ_TEST("pool: a chunked streaming body whose write was given up on before its connection "
    "took the request (while it waited, as the connection arrived, or during a retry), then "
    "dropped, never goes out as a complete request") {
  // POST /upload of unknown size (chunked, streamed); its one write waits for a connection, and
  // the caller gives up on it (a pump cancelled by a timeout, say), then drops the body once the
  // connection has taken the request. The body never ended: the request must fail and the server
  // must see no complete request, as when the body is dropped before the connection came (pinned
  // by request-differential-test) or the write is given up on after the connection took it (a
  // write that finished before it was given up is skipped: nothing to check).
  // What happens: Attempt::send() (pool.c++:438-447) hands the connection's body over whatever
  // `writeOutstanding` says; the given-up write's continuation (pool.c++:545) was destroyed with
  // its promise, so StreamFetcher's RequestBody never saw a write (writesPending 0), and
  // bodyDropped() (pool.c++:603, `innerBody = nullptr`) ends kj's chunked body with its
  // terminator: the server runs `POST /upload` with an empty body and the caller gets its 200.
  // The same on the retry path (an idle connection found closed at request time). Correct: a
  // write outstanding (`writeOutstanding`) when a connection takes the body makes that body
  // unfinishable, so dropping it fails the request and kj's body is aborted, never ended.
  kj::Vector<kj::String> bad;
  for (auto kind: {WriteKind::PLAIN, WriteKind::GATHERED}) {
    for (int k = -1; k <= 6; k++) {
      auto r = giveUpWriteThenDrop(nullptr, kind, k < 0 ? 0 : k, k < 0);
      if (r.wroteFirst) continue;
      if (r.serverSawComplete || r.response != nullptr) {
        bad.add(kj::str(kind == WriteKind::PLAIN ? "write" : "gathered write",
            k < 0 ? kj::str(" given up before the connection came") :
                    kj::str(" given up ", k, " turns after the connection came"),
            ": the server ran ", r.seen, "; response ",
            describe(r.response)));
      }
    }
  }
  {
    auto r = giveUpWriteDuringRetry();
    if (!r.wroteFirst && (r.serverSawComplete || r.response != nullptr)) {
      bad.add(kj::str("write given up while the request was sent again (its idle connection "
          "found closed at request time): the server ran a complete POST /upload; response ",
          describe(r.response)));
    }
  }
  KJ_EXPECT(bad.size() == 0, "a body given up on went out as a complete request",
      kj::strArray(bad, "\n"));
}

KJ_TEST("pool: a fixed-length streaming body whose write was given up on before, as or after its "
    "connection arrived, then dropped, fails its request; the server sees no complete request") {
  kj::Vector<kj::String> bad;
  for (auto kind: {WriteKind::PLAIN, WriteKind::GATHERED}) {
    for (int k = -1; k <= 6; k++) {
      auto r = giveUpWriteThenDrop(uint64_t(2 * MAX_REPLAY), kind, k < 0 ? 0 : k, k < 0);
      if (r.wroteFirst) continue;
      if (r.serverSawComplete || r.response != nullptr) {
        bad.add(kj::str(kind == WriteKind::PLAIN ? "write" : "gathered", " k=", k, ": ", r.seen));
      }
    }
  }
  KJ_EXPECT(bad.size() == 0, kj::strArray(bad, "\n"));
}

// =================================================================================================
// Other streaming-body edges: each must neither crash (ASan) nor send an unfinished body.

KJ_TEST("pool: a fixed-length streaming body dropped unwritten before its connection came fails "
    "the request at once, saying so, and the pool serves the next request; dropped after the "
    "connection took it, the request fails too; the server sees neither") {
  {
    GatedEnv env;
    auto h = env.headers();
    auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h,
        uint64_t(2 * MAX_REPLAY));
    auto response = request.response.eagerlyEvaluate(nullptr);
    env.turns(3);
    request.body = nullptr;
    auto e = env.failureOf(kj::mv(response));
    KJ_EXPECT(contains(e.getDescription(), "the request body was dropped before any of its 2048 "
        "bytes could be sent, so the request was not sent"), e);
    auto get = env.pool->request(kj::HttpMethod::GET, "/after", h);
    get.body = nullptr;
    auto after = outcomeOf(kj::mv(get.response)).eagerlyEvaluate(nullptr);
    env.turns(3);
    while (env.gates.size() > env.arrived) env.arrive();
    KJ_EXPECT(KJ_ASSERT_NONNULL(env.bounded(kj::mv(after))) == "echo:/after");
    env.settle();
    KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
  }
  {
    GatedEnv env;
    auto h = env.headers();
    auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h,
        uint64_t(2 * MAX_REPLAY));
    auto outcome = outcomeOf(kj::mv(request.response)).eagerlyEvaluate(nullptr);
    env.turns(3);
    env.arrive();
    env.turns(20);
    request.body = nullptr;
    KJ_EXPECT(env.bounded(kj::mv(outcome)) == nullptr);
    env.settle();
    KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
  }
}

KJ_TEST("pool: a second write while one waits for a connection is refused (FAILED, saying why); "
    "the first goes out when the connection comes and the request completes") {
  GatedEnv env;
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h);
  auto outcome = outcomeOf(kj::mv(request.response)).eagerlyEvaluate(nullptr);
  auto first = kj::str("first");
  auto second = kj::str("second");
  auto w1 = request.body->write(first.begin(), first.size()).eagerlyEvaluate(nullptr);
  auto e = KJ_ASSERT_NONNULL(test::failureIfAny(env,
      request.body->write(second.begin(), second.size())), "a concurrent write was taken");
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "has not finished"), e);
  env.arrive();
  env.bounded(kj::mv(w1));
  request.body = nullptr;
  KJ_EXPECT(KJ_ASSERT_NONNULL(env.bounded(kj::mv(outcome))) == "echo:/upload");
  env.settle();
  KJ_ASSERT(env.seen.size() == 1);
  KJ_EXPECT(contains(env.seen[0], "\r\n\r\n5\r\nfirst\r\n0\r\n\r\n"), env.seen[0]);
}

KJ_TEST("pool: zero-length writes to a streaming body before and after its connection came "
    "finish, send nothing of their own, and leave the body finishable") {
  GatedEnv env;
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h);
  auto outcome = outcomeOf(kj::mv(request.response)).eagerlyEvaluate(nullptr);
  auto empty = request.body->write("", 0).eagerlyEvaluate(nullptr);
  env.turns(3);
  env.arrive();
  env.bounded(kj::mv(empty));
  env.bounded(request.body->write("", 0));
  env.bounded(request.body->write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>>()));
  env.bounded(request.body->write("xy", 2));
  request.body = nullptr;
  KJ_EXPECT(KJ_ASSERT_NONNULL(env.bounded(kj::mv(outcome))) == "echo:/upload");
  env.settle();
  KJ_ASSERT(env.seen.size() == 1);
  KJ_EXPECT(contains(env.seen[0], "\r\n\r\n2\r\nxy\r\n0\r\n\r\n"), env.seen[0]);
}

KJ_TEST("pool: the response promise dropped while a streaming write waits fails the write "
    "(saying to keep the promise); the body dropped after sends nothing") {
  GatedEnv env;
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h);
  auto data = kj::str("abc");
  auto write = request.body->write(data.begin(), data.size()).eagerlyEvaluate(nullptr);
  env.turns(3);
  request.response = nullptr;
  auto e = KJ_ASSERT_NONNULL(test::failureIfAny(env, kj::mv(write)));
  KJ_EXPECT(contains(e.getDescription(), "the response promise was dropped"), e);
  request.body = nullptr;
  if (env.gates.size() > env.arrived) env.arrive();
  env.settle();
  KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
}

KJ_TEST("pool: the pool destroyed while a streaming write waits for a connection fails the write "
    "and the response, saying so; dropping the body after is safe") {
  GatedEnv env;
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h);
  auto response = request.response.then([](Response&&) -> kj::Maybe<kj::Exception> {
    return nullptr;
  }, [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); })
      .eagerlyEvaluate(nullptr);
  auto data = kj::str("abc");
  auto write = request.body->write(data.begin(), data.size()).eagerlyEvaluate(nullptr);
  env.turns(3);
  env.pool = nullptr;
  auto e = KJ_ASSERT_NONNULL(test::failureIfAny(env, kj::mv(write)));
  KJ_EXPECT(contains(e.getDescription(), "ConnectionPool was destroyed"), e);
  auto r = KJ_ASSERT_NONNULL(env.bounded(kj::mv(response)));
  KJ_EXPECT(contains(r.getDescription(), "ConnectionPool was destroyed"), r);
  request.body = nullptr;
  env.settle();
  KJ_EXPECT(env.seen.size() == 0, env.seen);
}

KJ_TEST("pool: a gathered write longer than a buffered body's expectedBodySize is refused whole; "
    "none of its pieces complete the body") {
  // POST /upload declared 3 bytes (under maxReplayBodyBytes: the pool buffers it), one gathered
  // write of "abc" + "d". kj-http's fixed-length body and StreamFetcher refuse such a write as a
  // whole (nothing of it is sent), and so does the pool's streaming body since today's fix (one
  // write); a caller told "longer than the declared 3 bytes" drops the body, and the request
  // fails. The pool's buffered body instead takes the pieces one by one
  // (PendingBody::write(pieces), pool.c++:715-721): "abc" completes the body (the request goes
  // out), then "d" fails the write. The caller sees its write fail, yet the server ran the
  // request and the response succeeds: a caller that sends it again on that error runs the POST
  // twice. Correct: a gathered write to a buffered body is checked as a whole against the
  // declared size first (as Attempt::write() does for one piece), and refused whole.
  GatedEnv env;
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h, uint64_t(3));
  auto outcome = outcomeOf(kj::mv(request.response)).eagerlyEvaluate(nullptr);
  auto abc = kj::str("abc");
  auto d = kj::str("d");
  kj::ArrayPtr<const kj::byte> pieces[] = {abc.asBytes(), d.asBytes()};
  auto e = test::failureIfAny(env, request.body->write(kj::arrayPtr(pieces, 2)));
  KJ_EXPECT(e != nullptr, "a gathered write of 4 bytes to a body declared 3 was taken");
  request.body = nullptr;  // the caller, told its write failed, gives the body up
  env.turns(3);
  if (env.gates.size() > env.arrived) env.arrive();
  auto result = env.bounded(kj::mv(outcome));
  env.settle();
  KJ_EXPECT(result == nullptr && !env.sawComplete("/upload"),
      "the write failed, yet the request was sent and answered", describe(result),
      e == nullptr ? kj::str("(no error)") : kj::str(KJ_ASSERT_NONNULL(e).getDescription()));
}

KJ_TEST("StreamFetcher: a gathered write longer than the declared body is refused whole; the body "
    "dropped then fails the request, and the server sees no complete request") {
  GatedEnv env;
  auto fetcher = kj::heap<StreamFetcher>(env.bounded(env.address->connect()), env.table);
  auto h = env.headers();
  auto request = fetcher->request(kj::HttpMethod::POST, "/upload", h, uint64_t(3));
  auto outcome = outcomeOf(kj::mv(request.response)).eagerlyEvaluate(nullptr);
  auto abc = kj::str("abc");
  auto d = kj::str("d");
  kj::ArrayPtr<const kj::byte> pieces[] = {abc.asBytes(), d.asBytes()};
  auto e = KJ_ASSERT_NONNULL(test::failureIfAny(env, request.body->write(kj::arrayPtr(pieces, 2))));
  KJ_EXPECT(contains(e.getDescription(), "longer than the declared 3 bytes"), e);
  request.body = nullptr;
  KJ_EXPECT(env.bounded(kj::mv(outcome)) == nullptr);
  env.settle();
  KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
}

// =================================================================================================
// CONNECT answers split at every byte (connector.c++: the search for the end resumes at
// `scanned`).

kj::String tunnelOutcome(kj::StringPtr answer, size_t cut, kj::StringPtr after) {
  // Opens a tunnel through a proxy (an in-process pipe) that sends `answer` then `after` in two
  // writes cut at `cut`; returns what the tunnel reads first, or "failed: " and why.
  test::LoopEnv env;
  kj::Own<test::Peer> proxy;
  auto connector = tunnelConnector([&]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    auto t = test::pipeTransport();
    proxy = kj::heap<test::Peer>(env.ws, kj::mv(t.server));
    return kj::mv(t.client);
  }, "origin.test:80");
  auto tunnel = connector().eagerlyEvaluate(nullptr);
  KJ_ASSERT(proxy.get() != nullptr);
  auto request = proxy->readHead();
  KJ_ASSERT(request.startsWith("CONNECT origin.test:80 "), request);
  auto all = kj::str(answer, after);
  auto first = kj::heapString(all.slice(0, cut).begin(), cut);
  auto second = kj::heapString(all.slice(cut));
  auto writes = proxy->sendLater(first).then([&]() {
    return second.size() > 0 ? proxy->sendLater(second) : kj::Promise<void>(kj::READY_NOW);
  }).catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);  // (refused: the pipe is gone)
  auto result = env.bounded(tunnel.then([&](kj::Own<kj::AsyncIoStream> stream) {
    if (after.size() == 0) return kj::Promise<kj::String>(kj::str("open"));
    auto buffer = kj::heapArray<char>(after.size());
    auto p = stream->read(buffer.begin(), buffer.size());
    return p.then([buffer = kj::mv(buffer)]() { return kj::heapString(buffer); })
        .attach(kj::mv(stream));
  }, [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
  env.bounded(kj::mv(writes));
  return result;
}

KJ_TEST("connector: CONNECT answers (CRLF and LF-only ends, interim answers first, bytes after) "
    "open the tunnel the same wherever they are cut, and lose no byte after the head") {
  struct Case {
    kj::StringPtr answer;
    kj::StringPtr after;
  };
  Case cases[] = {
    {"HTTP/1.1 200 Connection established\r\n\r\n", "tunnel!"},
    {"HTTP/1.1 200 OK\n\n", "\r\nbytes"},
    {"HTTP/1.1 200 OK\r\nVia: p\n\r\n", "\n\n"},
    {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\n\nHTTP/1.1 200 OK\r\nA: b\r\n\r\n", "x"},
    {"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\n\n", "\n"},
  };
  for (auto& c: cases) {
    auto total = strlen(c.answer.cStr()) + strlen(c.after.cStr());
    for (size_t cut = 1; cut < total; cut++) {
      auto got = tunnelOutcome(c.answer, cut, c.after);
      KJ_EXPECT(got == (c.after.size() > 0 ? c.after : "open"_kj), c.answer, cut, got);
    }
  }
}

KJ_TEST("connector: a CONNECT answer over 16 KiB without an end is refused, saying so, whether it "
    "comes whole or byte by byte around the limit") {
  kj::Vector<char> text;
  text.addAll("HTTP/1.1 200 OK\r\n"_kj);
  while (text.size() < 19 * 1024) text.addAll("X-Pad: aaaaaaaaaaaaaaaa\r\n"_kj);
  auto big = kj::heapString(text.begin(), text.size());  // no blank line yet: 19 KiB of one head
  for (size_t cut: {size_t(16 * 1024 - 1), size_t(16 * 1024), size_t(16 * 1024 + 1)}) {
    auto got = tunnelOutcome(big, cut, "");
    KJ_EXPECT(got.startsWith("failed: ") && contains(got, "is longer than"), cut, got);
  }
}

// =================================================================================================
// ResponseFramer: the session's changes, split at every byte.

struct Framed {
  bool complete = false;
  bool failed = false;
  kj::String failure;
  kj::String passed;
  size_t residue = 0;
  kj::String whyNot;
};

Framed frame(kj::StringPtr input, size_t cut, kj::HttpMethod method = kj::HttpMethod::GET,
    bool carried = false, size_t cut2 = 0) {
  // Feeds `input` to a framer in reads cut at `cut` (and `cut2`, if later), taking everything
  // passable after each read.
  ResponseFramer framer;
  framer.start(method, carried);
  Framed out;
  kj::Vector<char> passed;
  size_t pos = 0;
  auto takeAll = [&]() {
    kj::byte buf[4096];
    for (;;) {
      size_t n = framer.take(kj::arrayPtr(buf, sizeof(buf)));
      if (n == 0) break;
      passed.addAll(kj::arrayPtr(reinterpret_cast<char*>(buf), n));
    }
  };
  auto feedTo = [&](size_t stop) {
    while (pos < stop && framer.getFailure() == nullptr) {
      auto space = framer.space();
      size_t n = kj::min(space.size(), stop - pos);
      memcpy(space.begin(), input.begin() + pos, n);
      framer.received(n);
      pos += n;
      takeAll();
    }
  };
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
    if (cut > 0 && cut < input.size()) feedTo(cut);
    if (cut2 > cut && cut2 < input.size()) feedTo(cut2);
    feedTo(input.size());
  })) {
    out.failed = true;
    out.failure = kj::str(e.getDescription());
  }
  KJ_IF_SOME(f, framer.getFailure()) {
    out.failed = true;
    out.failure = kj::str(f.getDescription());
  }
  out.complete = framer.isComplete();
  if (out.complete) out.residue = framer.residueSize();
  if (framer.hasHead()) {
    KJ_IF_SOME(w, framer.whyNotReusable()) {
      out.whyNot = kj::str(w);
    }
  }
  out.passed = kj::heapString(passed.begin(), passed.size());
  return out;
}

KJ_TEST("framer: chunked trailers (fields, a fold continuing one, a fold first, a status line in "
    "their place) are judged the same at every cut") {
  struct Case {
    kj::StringPtr input;
    bool fails;
    kj::StringPtr says;  // in the failure
  };
  Case cases[] = {
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nA: b\r\n c\r\n"
     "\tmore\r\nD : e\r\n\r\n", false, ""},
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n c: folded first\r\n\r\n",
     true, "a line in its trailer section that is not a field"},
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nHTTP/1.1 200 OK\r\n"
     "Content-Length: 0\r\n\r\n", true, "a line in its trailer section that is not a field"},
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon here\r\n\r\n",
     true, "not a field"},
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n: no name\r\n\r\n",
     true, "not a field"},
  };
  for (auto& c: cases) {
    auto whole = frame(c.input, 0);
    KJ_EXPECT(whole.failed == c.fails, c.input, whole.failure);
    if (c.fails) {
      KJ_EXPECT(contains(whole.failure, c.says), whole.failure);
    } else {
      KJ_EXPECT(whole.complete && whole.residue == 0, c.input);
    }
    for (size_t cut = 1; cut < c.input.size(); cut++) {
      auto got = frame(c.input, cut);
      KJ_EXPECT(got.failed == whole.failed && got.complete == whole.complete &&
          got.passed == whole.passed && got.failure == whole.failure, c.input, cut, got.failure,
          whole.failure);
    }
  }
}

KJ_TEST("framer: leading blanks before the status line, after an interim response, and at a "
    "buffer's compaction frame the same at every pair of cuts") {
  kj::StringPtr inputs[] = {
    "   \t HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "HTTP/1.1 100 Continue\r\n\r\n  \tHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "  HTTP/1.1 103 Early\r\nLink: x\r\n\r\n \t  HTTP/1.1 204 No\r\n\r\n",
    "  \t  XTTP/1.1 200 OK\r\n\r\n",
    "HTTP/1.1 100 Continue\r\n\r\n   garbage that is not a status line\r\n\r\n",
  };
  for (auto input: inputs) {
    auto whole = frame(input, 0);
    for (size_t a = 1; a < input.size(); a++) {
      for (size_t b = a + 1; b < input.size(); b++) {
        auto got = frame(input, a, kj::HttpMethod::GET, false, b);
        KJ_EXPECT(got.failed == whole.failed && got.complete == whole.complete &&
            got.passed == whole.passed && got.failure == whole.failure, input, a, b,
            got.failure, whole.failure);
      }
    }
  }
  auto after = frame("HTTP/1.1 100 Continue\r\n\r\n   garbage that is not a status line\r\n", 0,
      kj::HttpMethod::GET, true);
  KJ_EXPECT(contains(after.failure, "after an interim (1xx) response"), after.failure);
  auto leftover = frame("ok extra bytes\r\nHTTP/1.1 200 OK\r\n\r\n", 0, kj::HttpMethod::GET,
      true);
  KJ_EXPECT(contains(leftover.failure, "on a connection that carried earlier responses"),
      leftover.failure);
  auto fresh = frame("SSH-2.0-OpenSSH\r\n", 0);
  KJ_EXPECT(contains(fresh.failure, "is not HTTP/1.x"), fresh.failure);
}

KJ_TEST("framer: HTTP/1.2-1.9 read as 1.1 (reusable), HTTP/1.0 with Transfer-Encoding is not "
    "reused even with keep-alive, HTTP/2.0 and HTTP/1.10 are refused") {
  auto v12 = frame("HTTP/1.2 200 OK\r\nContent-Length: 1\r\n\r\nx", 0);
  KJ_EXPECT(v12.complete && !v12.failed && v12.whyNot == "", v12.whyNot, v12.failure);
  auto v10te = frame("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked"
      "\r\n\r\n1\r\nx\r\n0\r\n\r\n", 0);
  KJ_EXPECT(v10te.complete && contains(v10te.whyNot, "HTTP/1.0 and Transfer-Encoding"),
      v10te.whyNot);
  auto v10ka = frame("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", 0);
  KJ_EXPECT(v10ka.complete && v10ka.whyNot == "", v10ka.whyNot);
  auto v2 = frame("HTTP/2.0 200 OK\r\nContent-Length: 1\r\n\r\nx", 0);
  KJ_EXPECT(v2.failed, v2.whyNot);
  auto v110 = frame("HTTP/1.10 200 OK\r\nContent-Length: 1\r\n\r\nx", 0);
  KJ_EXPECT(v110.failed);
}

// =================================================================================================
// The same, end to end through StreamFetcher: what the error says depends on what came before.

kj::Exception notAStatusLineVia(bool tcp, kj::StringPtr first, kj::StringPtr answer) {
  // Over a fresh connection, `first` (if any) answers GET /first, which must leave the connection
  // reusable; then `answer` answers GET /second, which must fail: returns why.
  test::FetcherEnv env(tcp);
  if (first.size() > 0) {
    auto s = env.start(kj::HttpMethod::GET, "/first", first);
    KJ_EXPECT(env.bounded(s.response.body->readAllText()) == "hello");
    env.bounded(kj::mv(s.written));
    s.response.body = nullptr;
    for (int i = 0; i < 3; i++) kj::evalLater([]() {}).wait(env.ws);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
  }
  auto h = env.headers();
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/second", h);
  req.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater(answer).catch_([](kj::Exception&&) {});
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  return e;
}

KJ_TEST("StreamFetcher: an answer that is not a status line says \"not HTTP\" on a fresh "
    "connection, \"the rest of an earlier response\" on a reused one (an HTTP/1.2 one too), and "
    "names the interim response it followed") {
  for (bool tcp: {false, true}) {
    KJ_CONTEXT(tcp);
    auto fresh = notAStatusLineVia(tcp, "", "SSH-2.0-OpenSSH_9.2\r\n");
    KJ_EXPECT(contains(fresh.getDescription(), "is not HTTP/1.x"), fresh);
    auto reused = notAStatusLineVia(tcp, "HTTP/1.2 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        "lo again\r\nHTTP/1.1 200 OK\r\n\r\n");
    KJ_EXPECT(contains(reused.getDescription(), "on a connection that carried earlier responses"),
        reused);
    auto interim = notAStatusLineVia(tcp, test::OK_HELLO,
        "HTTP/1.1 100 Continue\r\n\r\nnot a status line\r\n\r\n");
    KJ_EXPECT(contains(interim.getDescription(), "after an interim (1xx) response"), interim);
  }
}

// =================================================================================================
// Last, since ASan ends the run at its heap-use-after-free.

KJ_TEST("pool: a streaming write still awaited after its body and response promise were "
    "dropped fails cleanly, touching nothing freed (ASan)") {
  // The pool expects a write to outlive its body: when the body is dropped while a write waits
  // for a connection, the write is meant to fail ("the request body was dropped while a write to
  // it waited for a connection; keep the body stream until its writes finish", pool.c++:550, and
  // the response promise's deferred failPendingWrites(), pool.c++:810). But the continuation that
  // today's fix added to every streaming write (writeStreaming(), pool.c++:555,
  // `[this](kj::Exception&&) { writeOutstanding = false; ... }`) captures the Attempt by raw
  // pointer, and once the body and the response promise are both dropped nothing holds the
  // Attempt any more: awaiting the write then writes into freed memory. (Before the fix a
  // rejected waiter passed straight through without touching `this`.) Correct: the write's chain
  // holds a reference to the Attempt (kj::addRef), so it fails cleanly with the reason.
  // Fails under `--config=asan` only (ASan then ends the run: this case comes last); a plain build
  // writes one freed byte unnoticed.
  GatedEnv env;
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h);
  auto data = kj::str("abc");
  auto write = request.body->write(data.begin(), data.size());
  env.turns(3);
  request.body = nullptr;      // the body goes while its write waits (handled: the request fails)
  request.response = nullptr;  // and so does the response promise: the Attempt is freed
  auto e = test::failureIfAny(env, kj::mv(write));
  KJ_EXPECT(e != nullptr, "a write of a dropped body succeeded");
  env.settle();
  KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
}

}  // namespace
}  // namespace sockfetch
