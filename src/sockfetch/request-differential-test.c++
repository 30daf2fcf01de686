// What goes on the wire for a request, compared with kj-http's own client: a seeded differential
// that sends each generated request (every kj::HttpMethod, many url forms, header sets over
// several caller tables, bodies of every framing) through (1) kj::newHttpClient() over a plain
// connection, the reference, (2) a StreamFetcher, (3) a ConnectionPool with an idle connection
// (sent at once), (4) a ConnectionPool whose one connection is busy (sent later, from its copy),
// (5) a ConnectionPool retrying it (a stale keep-alive connection, or one found lost at request
// time), and checks that a loopback server reads the same bytes every time and that each response
// reaches the request it answers. Also: requests given up on while they wait, request bodies
// given up on, caller-supplied framing headers (which must never desynchronise a connection), and
// what writing to a body declared empty says.

#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::contains;
using test::Rng;
using test::ScriptedServer;
using Reply = ScriptedServer::Reply;
using Response = kj::HttpClient::Response;

constexpr size_t MAX_REPLAY = 1024;  // the pools' maxReplayBodyBytes: sizes around it are cheap

const kj::HttpMethod METHODS[] = {
#define METHOD(id) kj::HttpMethod::id,
  KJ_HTTP_FOR_EACH_METHOD(METHOD)
#undef METHOD
};

bool idempotent(kj::HttpMethod m) {
  switch (m) {
    case kj::HttpMethod::GET: case kj::HttpMethod::HEAD: case kj::HttpMethod::OPTIONS:
    case kj::HttpMethod::TRACE: case kj::HttpMethod::PUT: case kj::HttpMethod::DELETE:
      return true;
    default:
      return false;
  }
}

bool isGetOrHead(kj::HttpMethod m) {
  return m == kj::HttpMethod::GET || m == kj::HttpMethod::HEAD;
}

kj::String fieldOf(kj::StringPtr text, kj::StringPtr name) {
  // The value of the first field `name` (exact spelling) in a raw request head; "" if none.
  auto needle = kj::str("\r\n", name, ": ");
  const char* found = strstr(text.cStr(), needle.cStr());
  if (found == nullptr) return kj::str("");
  const char* start = found + needle.size();
  const char* end = strstr(start, "\r\n");
  return kj::heapString(start, end - start);
}

struct HeaderOp {
  bool viaId;            // set() with the caller table's id (when it has one), else add()
  kj::String name;
  kj::String value;
};

struct Spec {
  unsigned id;
  kj::HttpMethod method;
  kj::String url;
  unsigned table;
  kj::Vector<HeaderOp> ops;
  kj::Maybe<uint64_t> size;
  kj::Vector<kj::String> writes;
  bool hasTe = false;  // a non-empty Transfer-Encoding field in the caller's headers
  bool gathered = false;  // the writes go as one write(pieces) (fixed length only: chunked
                          // bodies would differ in chunk boundaries alone, which mean nothing)

  kj::String tag() const { return kj::str("r", id); }
  bool bodiless() const {
    return isGetOrHead(method) && (size == nullptr ? !hasTe : KJ_ASSERT_NONNULL(size) == 0);
  }
  bool replayable() const {
    // What the pool buffers (or needs not): no body, or one of known size up to MAX_REPLAY.
    if (bodiless()) return true;
    KJ_IF_SOME(s, size) {
      return s <= MAX_REPLAY;
    }
    return false;
  }
};

struct Outcome {
  unsigned status = 0;
  kj::String echo;
  kj::String body;
};

kj::String echoOf(const kj::HttpHeaders& headers) {
  kj::String result = kj::str("");
  headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
    if (name == "X-Echo") result = kj::str(value);
  });
  return result;
}

kj::Promise<Outcome> drive(kj::HttpClient& client, const Spec& spec, const kj::HttpHeaders& h) {
  // Sends `spec` (whose headers need only live through this call), writes its body, drops it,
  // reads the response to its end.
  auto request = client.request(spec.method, spec.url, h, spec.size);
  auto body = kj::mv(request.body);
  auto& bodyRef = *body;
  kj::Promise<void> writes = kj::READY_NOW;
  if (spec.gathered) {
    auto pieces = kj::heapArray<kj::ArrayPtr<const kj::byte>>(spec.writes.size());
    for (size_t i = 0; i < pieces.size(); i++) pieces[i] = spec.writes[i].asBytes();
    writes = bodyRef.write(pieces).attach(kj::mv(pieces));
  } else {
    for (auto& w: spec.writes) {
      writes = writes.then([&bodyRef, &w]() { return bodyRef.write(w.begin(), w.size()); });
    }
  }
  writes = writes.attach(kj::mv(body));
  auto response = request.response.then([](Response&& r) {
    auto status = r.statusCode;
    auto echo = echoOf(*r.headers);
    auto& in = *r.body;
    return in.readAllText().attach(kj::mv(r.body))
        .then([status, echo = kj::mv(echo)](kj::String&& text) mutable {
      return Outcome{status, kj::mv(echo), kj::mv(text)};
    });
  });
  return writes.then([response = kj::mv(response)]() mutable { return kj::mv(response); });
}

struct Seen {
  unsigned path;
  kj::String tag;
  kj::String text;
};

struct Env: public test::LoopEnv {
  kj::Vector<kj::String> manyNames;
  kj::Vector<kj::Own<kj::HttpHeaderTable>> tables;
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  kj::Vector<Seen> seen;
  unsigned path = 0;            // which path the requests now arriving came through
  bool closeNextRequest = false;
  kj::Duration blockDelay = 30 * kj::MILLISECONDS;

  kj::Own<kj::AsyncIoStream> refStream;
  kj::Own<kj::HttpClient> reference;
  kj::Own<StreamFetcher> fetcher;
  kj::Own<ConnectionPool> atOnce;
  kj::Own<ConnectionPool> queued;
  kj::Own<ConnectionPool> retrying;

  Env() {
    limit = 5 * kj::SECONDS;
    // The caller tables: the pool's own (built-ins only), and tables registering names the
    // pool's lacks, in other spellings, many of them.
    tables.add(kj::heap<kj::HttpHeaderTable>());
    {
      kj::HttpHeaderTable::Builder b;
      b.add("X-Reg");
      b.add("X-Dup");
      tables.add(b.build());
    }
    {
      kj::HttpHeaderTable::Builder b;
      b.add("x-reg");
      b.add("X-Other");
      b.add("x-empty");
      tables.add(b.build());
    }
    {
      kj::HttpHeaderTable::Builder b;
      // (A table keeps the names it is given, not copies.)
      for (unsigned i = 0; i < 60; i++) b.add(manyNames.add(kj::str("X-Many-", i)));
      b.add("X-Reg");
      b.add("X-Long");
      b.add("X-Empty");
      tables.add(b.build());
    }
    server = kj::heap<ScriptedServer>(io, "127.0.0.1",
        [this](unsigned, unsigned, kj::StringPtr text) { return answer(text); });
    address = server->address();
    refStream = bounded(address->connect());
    reference = kj::newHttpClient(table, *refStream);
    fetcher = kj::heap<StreamFetcher>(bounded(address->connect()), table);
    atOnce = pool(64);
    queued = pool(1);
    retrying = pool(64);
  }

  kj::Own<ConnectionPool> pool(unsigned maxConnections) {
    ConnectionPool::Settings settings;
    settings.maxConnections = maxConnections;
    settings.maxReplayBodyBytes = MAX_REPLAY;
    return kj::heap<ConnectionPool>(timer, table,
        [this]() { return address->connect(); }, kj::mv(settings));
  }

  Reply answer(kj::StringPtr text) {
    auto tag = fieldOf(text, "X-Req-Id");
    if (tag != "warm" && tag != "block") seen.add(Seen{path, kj::str(tag), kj::str(text)});
    Reply reply;
    if (closeNextRequest) {
      closeNextRequest = false;
      reply.closeAfter = true;  // read the request, close without a word (the keep-alive race)
      return reply;
    }
    bool head = text.startsWith("HEAD ");
    auto body = kj::str("echo:", tag);
    reply.bytes = kj::str("HTTP/1.1 200 OK\r\nX-Echo: ", tag, "\r\nContent-Length: ",
        body.size(), "\r\n\r\n", head ? kj::StringPtr("") : kj::StringPtr(body));
    if (tag == "block") reply.delay = blockDelay;
    return reply;
  }

  kj::HttpHeaders headersFor(const Spec& spec) {
    auto& t = *tables[spec.table];
    kj::HttpHeaders h(t);
    for (auto& op: spec.ops) {
      if (op.viaId) {
        KJ_IF_SOME(id, t.stringToId(op.name)) {
          h.set(id, op.value);
          continue;
        }
      }
      h.add(op.name, op.value);
    }
    return h;
  }

  Spec simple(kj::StringPtr tag, kj::StringPtr url) {
    Spec s{0, kj::HttpMethod::GET, kj::str(url), 0, {}, nullptr, {}};
    s.ops.add(HeaderOp{false, kj::str("Host"), kj::str("upstream.test")});
    s.ops.add(HeaderOp{false, kj::str("X-Req-Id"), kj::str(tag)});
    return s;
  }

  void warm(ConnectionPool& pool) {
    auto s = simple("warm", "/warm");
    auto h = headersFor(s);
    auto out = bounded(drive(pool, s, h));
    KJ_ASSERT(out.echo == "warm", out.echo);
  }

  kj::Vector<kj::String> textsOf(unsigned p, kj::StringPtr tag) {
    kj::Vector<kj::String> result;
    for (auto& s: seen) {
      if (s.path == p && s.tag == tag) result.add(kj::str(s.text));
    }
    return result;
  }
};

Spec generate(Rng& rng, unsigned id, size_t tables) {
  Spec s;
  s.id = id;
  s.method = rng.pick(METHODS);
  s.table = rng.below(tables);

  // The url.
  switch (rng.below(7)) {
    case 0: s.url = kj::str("/"); break;
    case 1: s.url = kj::str("/p/", id, "/x.y"); break;
    case 2: s.url = kj::str("/q?a=", id, "&b=%20c&d=&e=%2F%00%FF&f=\xc3\xa9"); break;
    case 3: s.url = kj::str("http://upstream.test:8080/abs/", id, "?z=1"); break;
    case 4: s.url = kj::str("/long/", kj::repeat('a', 200 + rng.below(3000))); break;
    case 5: s.url = kj::str("/%E2%82%AC/%25/", id, "#frag"); break;
    case 6:
      s.url = s.method == kj::HttpMethod::OPTIONS ? kj::str("*") : kj::str("/star", id);
      break;
  }
  if (s.method == kj::HttpMethod::OPTIONS && rng.chance(30)) s.url = kj::str("*");

  // The headers. The request's identity goes anywhere among them.
  unsigned n = rng.below(8);
  unsigned tagAt = rng.below(n + 1);
  bool hostDone = false;
  for (unsigned i = 0; i <= n; i++) {
    if (i == tagAt) s.ops.add(HeaderOp{false, kj::str("X-Req-Id"), s.tag()});
    if (i == n) break;
    switch (rng.below(14)) {
      case 0:
        if (!hostDone) s.ops.add(HeaderOp{true, kj::str("Host"), kj::str("upstream.test")});
        hostDone = true;
        break;
      case 1: s.ops.add(HeaderOp{true, kj::str("X-Reg"), kj::str("reg", i)}); break;
      case 2: s.ops.add(HeaderOp{false, kj::str("x-reg"), kj::str("lower", i)}); break;
      case 3:
        s.ops.add(HeaderOp{false, kj::str("X-Dup"), kj::str("d1")});
        s.ops.add(HeaderOp{false, kj::str("X-Dup"), kj::str(rng.chance(50) ? "" : "d2")});
        break;
      case 4: s.ops.add(HeaderOp{rng.chance(50), kj::str("X-Empty"), kj::str("")}); break;
      case 5:
        s.ops.add(HeaderOp{true, kj::str("X-Long"),
            kj::str(kj::repeat('v', 100 + rng.below(4000)))});
        break;
      case 6: s.ops.add(HeaderOp{true, kj::str("X-Many-", rng.below(70)), kj::str("m", i)}); break;
      case 7: s.ops.add(HeaderOp{false, kj::str("Accept"), kj::str("a/", i)}); break;
      case 8: s.ops.add(HeaderOp{false, kj::str("Connection"), kj::str("close")}); break;
      case 9:
        s.ops.add(HeaderOp{false, kj::str("Transfer-Encoding"), kj::str("chunked")});
        s.hasTe = true;
        break;
      case 10: s.ops.add(HeaderOp{false, kj::str("Content-Length"), kj::str(rng.below(99))}); break;
      case 11: s.ops.add(HeaderOp{false, kj::str("x-free-", i), kj::str(" spaced value ")}); break;
      case 12: s.ops.add(HeaderOp{false, kj::str("Cookie"), kj::str("c=", i)}); break;
      case 13: s.ops.add(HeaderOp{false, kj::str("Keep-Alive"), kj::str("timeout=1")}); break;
    }
  }

  // The body.
  static const uint64_t SIZES[] = {0, 1, 7, 100, MAX_REPLAY - 1, MAX_REPLAY, MAX_REPLAY + 1, 3000};
  unsigned bodyKind = rng.below(3);  // 0: no size given, 1: a size, 2: size 0
  if (bodyKind == 1) s.size = rng.pick(SIZES);
  if (bodyKind == 2) s.size = uint64_t(0);
  if (!s.bodiless()) {
    uint64_t total;
    KJ_IF_SOME(size, s.size) {
      total = size;
    } else {
      total = rng.chance(20) ? 1500 : rng.below(60);
    }
    unsigned pieces = total == 0 ? 0 : 1 + rng.below(3);
    uint64_t left = total;
    for (unsigned i = 0; i < pieces; i++) {
      uint64_t take = i + 1 == pieces ? left : rng.below(left + 1);
      if (take == 0 && s.size == nullptr) continue;  // (a zero-length write adds no chunk)
      auto w = kj::heapString(take);
      for (size_t j = 0; j < take; j++) w[j] = 'A' + (id + i + j) % 26;
      s.writes.add(kj::mv(w));
      left -= take;
    }
    s.gathered = s.size != nullptr && s.writes.size() > 1 && rng.chance(50);
  }
  return s;
}

void checkOutcome(const Spec& spec, Outcome& out, kj::StringPtr path) {
  KJ_EXPECT(out.status == 200, path, spec.id, out.status);
  KJ_EXPECT(out.echo == spec.tag(), "a response reached another request", path, spec.tag(),
      out.echo);
  auto body = spec.method == kj::HttpMethod::HEAD ? kj::str("") : kj::str("echo:", spec.tag());
  KJ_EXPECT(out.body == body, "a response body reached another request", path, spec.tag(),
      out.body);
}

void runDifferential(uint64_t seed, unsigned count) {
  KJ_CONTEXT(seed);
  Env env;
  Rng rng(seed);
  kj::Vector<Spec> specs;
  for (unsigned i = 0; i < count; i++) specs.add(generate(rng, unsigned(seed * 1000 + i),
      env.tables.size()));

  env.warm(*env.atOnce);
  env.warm(*env.retrying);

  // (1) the reference, (2) StreamFetcher, (3) the pool at once: one request at a time.
  for (auto& spec: specs) {
    KJ_CONTEXT(spec.id, spec.method, spec.url.size(), spec.table);
    env.path = 1;
    {
      auto h = env.headersFor(spec);
      auto out = env.bounded(drive(*env.reference, spec, h));
      checkOutcome(spec, out, "reference");
    }
    env.path = 2;
    {
      auto h = env.headersFor(spec);
      auto promise = drive(*env.fetcher, spec, h);
      h.clear();
      auto out = env.bounded(kj::mv(promise));
      checkOutcome(spec, out, "StreamFetcher");
      KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.fetcher->getState(),
          env.fetcher->getCloseReason().orDefault(""));
    }
    env.path = 3;
    {
      auto waits = env.atOnce->getStats().waits;
      auto opened = env.atOnce->getStats().connectionsOpened;
      auto h = env.headersFor(spec);
      auto promise = drive(*env.atOnce, spec, h);
      h.clear();
      auto out = env.bounded(kj::mv(promise));
      checkOutcome(spec, out, "pool at once");
      KJ_EXPECT(env.atOnce->getStats().waits == waits);
      KJ_EXPECT(env.atOnce->getStats().connectionsOpened == opened, "not sent on the idle one");
    }
  }

  // (4) the pool, later: its one connection busy with a slow request, a batch waits behind it.
  env.path = 4;
  for (size_t start = 0; start < specs.size(); start += 12) {
    auto end = kj::min(start + 12, specs.size());
    auto waits = env.queued->getStats().waits;
    kj::Vector<kj::Promise<Outcome>> all;
    auto blocker = env.simple("block", "/block");
    {
      auto h = env.headersFor(blocker);
      all.add(drive(*env.queued, blocker, h).eagerlyEvaluate(nullptr));
    }
    for (size_t i = start; i < end; i++) {
      auto h = env.headersFor(specs[i]);
      all.add(drive(*env.queued, specs[i], h).eagerlyEvaluate(nullptr));
    }
    auto outs = env.bounded(kj::joinPromises(all.releaseAsArray()));
    KJ_EXPECT(outs[0].echo == "block", outs[0].echo);
    for (size_t i = start; i < end; i++) {
      KJ_CONTEXT(specs[i].id, specs[i].method);
      checkOutcome(specs[i], outs[i - start + 1], "pool later");
    }
    KJ_EXPECT(env.queued->getStats().waits - waits == end - start,
        "the batch did not wait for the busy connection", env.queued->getStats().waits - waits);
  }

  // (5) the pool, again: a replayable idempotent request meets a stale keep-alive connection
  // (the server reads it and closes); any other is found lost at request time (the server closed
  // the idle connection, the pool has not noticed yet).
  env.path = 5;
  for (auto& spec: specs) {
    KJ_CONTEXT(spec.id, spec.method, spec.url.size(), spec.table);
    bool stale = idempotent(spec.method) && spec.replayable();
    auto retries = env.retrying->getStats().retries;
    KJ_ASSERT(env.retrying->getIdleCount() == 1, env.retrying->getIdleCount());
    if (stale) {
      env.closeNextRequest = true;
    } else {
      auto open = env.server->open;
      env.server->closeIdleConnections();
      for (int i = 0; i < 20 && env.server->open == open; i++) kj::evalLater([]() {}).wait(env.ws);
      KJ_ASSERT(env.server->open < open, "the server did not close its idle connection");
    }
    auto h = env.headersFor(spec);
    auto promise = drive(*env.retrying, spec, h);
    h.clear();
    auto out = env.bounded(kj::mv(promise));
    checkOutcome(spec, out, "pool retried");
    if (stale) {
      KJ_EXPECT(env.retrying->getStats().retries == retries + 1, "not retried");
    }
    env.settle(1 * kj::MILLISECONDS);
  }

  // The same bytes everywhere.
  for (auto& spec: specs) {
    KJ_CONTEXT(spec.id, spec.method, spec.table);
    auto ref = env.textsOf(1, spec.tag());
    KJ_ASSERT(ref.size() == 1, ref.size());
    for (unsigned p: {2u, 3u, 4u, 5u}) {
      auto texts = env.textsOf(p, spec.tag());
      unsigned expected = p == 5 && idempotent(spec.method) && spec.replayable() ? 2 : 1;
      KJ_EXPECT(texts.size() == expected, p, texts.size());
      for (auto& t: texts) {
        KJ_EXPECT(t == ref[0], "the server read other bytes than kj-http's own client sends", p,
            ref[0], t);
      }
    }
  }
  KJ_EXPECT(env.server->pipelined == 0, env.server->pipelined);
}

KJ_TEST("differential: the same request goes out byte for byte alike through kj-http, "
    "StreamFetcher, and the pool at once, later and retried (seed 1)") {
  runDifferential(1, 110);
}

KJ_TEST("differential: the same request goes out byte for byte alike through kj-http, "
    "StreamFetcher, and the pool at once, later and retried (seed 2)") {
  runDifferential(2, 110);
}

KJ_TEST("differential: the same request goes out byte for byte alike through kj-http, "
    "StreamFetcher, and the pool at once, later and retried (seed 3)") {
  runDifferential(3, 110);
}

// =================================================================================================
// A body write given up on (its promise dropped before it finished), then the body dropped: the
// request body never ended, so the request must not reach the server as a complete one.

struct CancelEnv: public test::LoopEnv {
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  kj::Vector<kj::String> seen;  // every complete request the server read
  kj::Own<ConnectionPool> pool;

  explicit CancelEnv(unsigned maxConnections) {
    limit = 5 * kj::SECONDS;
    server = kj::heap<ScriptedServer>(io, "127.0.0.1",
        [this](unsigned, unsigned, kj::StringPtr text) {
      seen.add(kj::str(text));
      auto reply = test::ok(kj::str("echo:", test::pathOf(text)));
      if (test::pathOf(text) == "/block") reply.delay = 50 * kj::MILLISECONDS;
      return reply;
    });
    address = server->address();
    ConnectionPool::Settings settings;
    settings.maxConnections = maxConnections;
    settings.maxReplayBodyBytes = MAX_REPLAY;
    pool = kj::heap<ConnectionPool>(timer, table,
        [this]() { return address->connect(); }, kj::mv(settings));
  }

  kj::Promise<kj::String> get(kj::HttpClient& client, kj::StringPtr url) {
    auto h = headers();
    auto request = client.request(kj::HttpMethod::GET, url, h);
    request.body = nullptr;
    return request.response.then([](Response&& r) {
      auto& body = *r.body;
      return body.readAllText().attach(kj::mv(r.body));
    });
  }

  bool sawComplete(kj::StringPtr path) {
    for (auto& t: seen) {
      if (test::pathOf(t) == path) return true;
    }
    return false;
  }
};

kj::Maybe<kj::String> uploadWithCancelledWrite(CancelEnv& env, kj::HttpClient& client,
    kj::Maybe<uint64_t> size, bool turnFirst) {
  // POST /upload with a body whose one write is given up on, then dropped. Returns the response
  // body if the request succeeded, null if it failed.
  auto h = env.headers();
  auto request = client.request(kj::HttpMethod::POST, "/upload", h, size);
  h.clear();
  auto response = request.response.then([](Response&& r) {
    auto& body = *r.body;
    return body.readAllText().attach(kj::mv(r.body));
  }).eagerlyEvaluate(nullptr);
  {
    auto data = kj::str(kj::repeat('u', 2 * MAX_REPLAY));
    auto write = request.body->write(data.begin(), data.size());
    if (turnFirst) {
      env.settle(5 * kj::MILLISECONDS);
      KJ_EXPECT(!write.poll(env.ws), "the write finished: the case tests nothing");
    }
    // `write` is dropped here: the caller gave up on it (a pump cancelled by a timeout, say).
  }
  request.body = nullptr;
  auto outcome = response.then([](kj::String&& text) -> kj::Maybe<kj::String> {
    return kj::mv(text);
  }, [](kj::Exception&&) -> kj::Maybe<kj::String> { return nullptr; });
  return env.bounded(kj::mv(outcome));
}

KJ_TEST("a chunked body whose write was given up on, then dropped, never ends: "
    "StreamFetcher and the pool sending at once fail the request, the server sees no "
    "complete request") {
  {
    CancelEnv env(1);
    auto fetcher = kj::heap<StreamFetcher>(env.bounded(env.address->connect()), env.table);
    auto result = uploadWithCancelledWrite(env, *fetcher, nullptr, false);
    KJ_EXPECT(result == nullptr, "StreamFetcher: a body never ended, yet the request succeeded");
    env.settle();
    KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
  }
  {
    CancelEnv env(1);
    KJ_EXPECT(env.bounded(env.get(*env.pool, "/warm")) == "echo:/warm");
    auto result = uploadWithCancelledWrite(env, *env.pool, nullptr, false);
    KJ_EXPECT(result == nullptr, "pool at once: a body never ended, yet the request succeeded");
    env.settle();
    KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
    KJ_EXPECT(env.pool->getStats().waits == 0);
  }
}

KJ_TEST("a chunked body whose write was given up on while the request waited for a "
    "connection, then dropped, fails the request, which is never sent") {
  // The pool's one connection is busy, so POST /upload (unknown size: chunked, streamed) waits;
  // its write waits for a connection too. The caller gives up on the write and drops the body.
  // The body never ended: as StreamFetcher (and the pool when it sends at once, above), the pool
  // fails the request (FAILED, the body was dropped while a write to it was unfinished) and sends
  // nothing, where ending kj's chunked body would have sent a POST with an empty body the caller
  // never meant.
  CancelEnv env(1);
  auto blocker = env.get(*env.pool, "/block").eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return env.pool->getOpenCount() == 1 && env.server->busy == 1; });
  KJ_ASSERT(env.server->busy == 1, "the blocking request is not in flight");
  auto result = uploadWithCancelledWrite(env, *env.pool, nullptr, true);
  KJ_EXPECT(env.bounded(kj::mv(blocker)) == "echo:/block");
  KJ_EXPECT(env.pool->getStats().waits == 1, env.pool->getStats().waits);
  env.settle();
  KJ_EXPECT(!env.sawComplete("/upload"),
      "the server ran a request whose body the caller never finished", env.seen);
  KJ_EXPECT(result == nullptr, "the request succeeded");
}

KJ_TEST("a streaming body given up on while its request waits fails the request at once, saying "
    "why, and refuses later writes; the connection it waited for serves the next request") {
  CancelEnv env(1);
  auto blocker = env.get(*env.pool, "/block").eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return env.server->busy == 1; });
  KJ_ASSERT(env.server->busy == 1, "the blocking request is not in flight");
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::POST, "/upload", h);
  auto response = request.response.eagerlyEvaluate(nullptr);
  auto data = kj::str("abc");
  {
    auto write = request.body->write(data.begin(), data.size());
    env.settle(5 * kj::MILLISECONDS);
    KJ_EXPECT(!write.poll(env.ws), "the write finished: the case tests nothing");
  }
  auto later = KJ_ASSERT_NONNULL(test::failureIfAny(env,
      request.body->write(data.begin(), data.size())), "a write after a given-up one succeeded");
  KJ_EXPECT(later.getType() == kj::Exception::Type::FAILED, later);
  KJ_EXPECT(contains(later.getDescription(), "a write to this request body was given up on"),
      later);
  request.body = nullptr;
  auto e = env.failureOf(kj::mv(response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "the request body was dropped while a write to it was "
      "unfinished, so the request was not sent"), e);
  KJ_EXPECT(!blocker.poll(env.ws), "the failure waited for a connection");
  KJ_EXPECT(env.bounded(kj::mv(blocker)) == "echo:/block");
  KJ_EXPECT(env.pool->getWaitingCount() == 0, env.pool->getWaitingCount());
  KJ_EXPECT(env.bounded(env.get(*env.pool, "/after")) == "echo:/after");
  env.settle();
  KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
  KJ_EXPECT(env.server->accepted == 1, env.server->accepted);
}

KJ_TEST("a fixed-length streamed body whose write was given up on while the request waited "
    "for a connection, then dropped, fails the request; the server sees no complete request") {
  CancelEnv env(1);
  auto blocker = env.get(*env.pool, "/block").eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return env.pool->getOpenCount() == 1 && env.server->busy == 1; });
  KJ_ASSERT(env.server->busy == 1, "the blocking request is not in flight");
  auto result = uploadWithCancelledWrite(env, *env.pool, uint64_t(2 * MAX_REPLAY), true);
  KJ_EXPECT(env.bounded(kj::mv(blocker)) == "echo:/block");
  env.settle();
  KJ_EXPECT(!env.sawComplete("/upload"), env.seen);
  KJ_EXPECT(result == nullptr, "the request succeeded");
  // Nothing of the unfinished request was sent: the connection serves the next one.
  KJ_EXPECT(env.bounded(env.get(*env.pool, "/after")) == "echo:/after");
  KJ_EXPECT(env.server->accepted == 1, env.server->accepted);
}

KJ_TEST("requests waiting for a busy connection, some given up on while they wait: each "
    "answered one gets its own response, and none given up on reaches the server") {
  Env env;
  Rng rng(7);
  kj::Vector<Spec> specs;
  for (unsigned i = 0; i < 40; i++) specs.add(generate(rng, 7000 + i, env.tables.size()));
  env.path = 4;
  for (size_t start = 0; start < specs.size(); start += 8) {
    auto end = kj::min(start + 8, specs.size());
    auto blocker = env.simple("block", "/block");
    kj::Promise<Outcome> blocking = nullptr;
    {
      auto h = env.headersFor(blocker);
      blocking = drive(*env.queued, blocker, h).eagerlyEvaluate(nullptr);
    }
    kj::Vector<kj::Maybe<kj::Promise<Outcome>>> all;
    for (size_t i = start; i < end; i++) {
      auto h = env.headersFor(specs[i]);
      all.add(drive(*env.queued, specs[i], h).eagerlyEvaluate(nullptr));
    }
    env.settle(2 * kj::MILLISECONDS);
    kj::Vector<bool> gaveUp;
    for (size_t i = start; i < end; i++) {
      bool drop = (i % 3) == 1;
      if (drop) all[i - start] = nullptr;
      gaveUp.add(drop);
    }
    KJ_EXPECT(env.bounded(kj::mv(blocking)).echo == "block");
    // The first in line is given up on just as the connection came free (handed to it, or about
    // to be): whichever, the rest are still answered, each with its own response.
    all[0] = nullptr;
    bool firstMaySend = !gaveUp[0];
    gaveUp[0] = true;
    for (size_t i = start; i < end; i++) {
      KJ_CONTEXT(specs[i].id, specs[i].method);
      KJ_IF_SOME(promise, all[i - start]) {
        auto out = env.bounded(kj::mv(promise));
        checkOutcome(specs[i], out, "pool later");
      }
    }
    env.settle(2 * kj::MILLISECONDS);
    for (size_t i = start; i < end; i++) {
      auto texts = env.textsOf(4, specs[i].tag());
      if (i == start && firstMaySend) {
        KJ_EXPECT(texts.size() <= 1, specs[i].id, texts.size());
      } else {
        KJ_EXPECT(texts.size() == (gaveUp[i - start] ? 0 : 1), specs[i].id, texts.size());
      }
    }
  }
  KJ_EXPECT(env.server->pipelined == 0, env.server->pipelined);
}

KJ_TEST("caller-supplied framing fields (Content-Length, Transfer-Encoding, Connection, "
    "Keep-Alive, TE, Upgrade) that contradict the body never reach the wire, on every path, and "
    "the connection's next request is read as sent") {
  Env env;
  env.warm(*env.atOnce);
  struct Case { kj::HttpMethod method; kj::Maybe<uint64_t> size; kj::StringPtr body; };
  Case cases[] = {
    {kj::HttpMethod::GET, nullptr, ""},
    {kj::HttpMethod::GET, uint64_t(0), ""},
    {kj::HttpMethod::HEAD, nullptr, ""},
    {kj::HttpMethod::POST, uint64_t(3), "abc"},
    {kj::HttpMethod::PUT, nullptr, "abcdef"},
    {kj::HttpMethod::POST, uint64_t(0), ""},
  };
  unsigned n = 0;
  for (auto& c: cases) {
    for (unsigned p: {1u, 2u, 3u, 4u}) {
      KJ_CONTEXT(c.method, p);
      Spec s{9000 + n++, c.method, kj::str("/framing"), 0, {}, c.size, {}};
      s.ops.add(HeaderOp{false, kj::str("Host"), kj::str("upstream.test")});
      s.ops.add(HeaderOp{false, kj::str("Content-Length"), kj::str("77")});
      s.ops.add(HeaderOp{false, kj::str("Connection"), kj::str("close")});
      s.ops.add(HeaderOp{false, kj::str("Keep-Alive"), kj::str("timeout=1")});
      s.ops.add(HeaderOp{false, kj::str("TE"), kj::str("trailers")});
      s.ops.add(HeaderOp{false, kj::str("Upgrade"), kj::str("h2c")});
      if (!isGetOrHead(c.method)) {
        // (On a GET or HEAD without a size it would ask kj-http for a chunked body.)
        s.ops.add(HeaderOp{false, kj::str("Transfer-Encoding"), kj::str("gzip, chunked")});
      }
      s.ops.add(HeaderOp{false, kj::str("X-Req-Id"), s.tag()});
      if (c.body.size() > 0) s.writes.add(kj::str(c.body));
      env.path = p;
      kj::HttpClient& client = p == 1 ? *env.reference : p == 2 ? static_cast<kj::HttpClient&>(
          *env.fetcher) : p == 3 ? *env.atOnce : *env.queued;
      {
        auto h = env.headersFor(s);
        auto out = env.bounded(drive(client, s, h));
        checkOutcome(s, out, "framing");
      }
      // The next request on the same connection is read as sent.
      Spec next = env.simple(kj::str("after", s.id), "/next");
      next.id = s.id + 500;
      next.ops[1].value = next.tag();
      {
        auto h = env.headersFor(next);
        auto out = env.bounded(drive(client, next, h));
        checkOutcome(next, out, "framing: next");
      }
      auto texts = env.textsOf(p, s.tag());
      KJ_ASSERT(texts.size() == 1, texts.size());
      auto& t = texts[0];
      KJ_EXPECT(!contains(t, "Content-Length: 77"), t);
      KJ_EXPECT(!contains(t, "Connection:"), t);
      KJ_EXPECT(!contains(t, "Keep-Alive:"), t);
      KJ_EXPECT(!contains(t, "Upgrade:"), t);
      KJ_EXPECT(!contains(t, "gzip"), t);
      KJ_EXPECT(!contains(t, "TE:"), t);
      KJ_EXPECT(t.endsWith(kj::str("\r\n\r\n", c.size == nullptr && c.method == kj::HttpMethod::PUT
          ? kj::str("6\r\nabcdef\r\n0\r\n\r\n") : kj::str(c.body))), t);
      auto nextTexts = env.textsOf(p, next.tag());
      KJ_EXPECT(nextTexts.size() == 1 && nextTexts[0].startsWith("GET /next HTTP/1.1\r\n"),
          nextTexts);
    }
  }
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 12, env.fetcher->getCompletedRequests());
  KJ_EXPECT(env.atOnce->getStats().connectionsOpened == 1);
  KJ_EXPECT(env.server->pipelined == 0);
}

KJ_TEST("writing to the body of a GET, HEAD or POST made with expectedBodySize 0 says the body is "
    "longer than the declared 0 bytes, on every path") {
  // A GET or HEAD with expectedBodySize 0 has no body on the wire (as kj-http sends it), so its
  // body stream is bodilessRequestBody(0), whose error must not tell the caller to pass an
  // expectedBodySize it did pass.
  Env env;
  env.warm(*env.atOnce);
  for (auto method: {kj::HttpMethod::GET, kj::HttpMethod::HEAD, kj::HttpMethod::POST}) {
    for (unsigned p: {2u, 3u, 4u}) {
      KJ_CONTEXT(method, p);
      kj::HttpClient& client = p == 2 ? static_cast<kj::HttpClient&>(*env.fetcher)
          : p == 3 ? *env.atOnce : *env.queued;
      auto h = env.headers();
      h.add("X-Req-Id", "zero");
      auto request = client.request(method, "/zero", h, uint64_t(0));
      auto failure = test::failureIfAny(env, request.body->write("x", 1));
      KJ_ASSERT(failure != nullptr, "a byte was written to a body declared empty");
      auto e = kj::mv(KJ_ASSERT_NONNULL(failure));
      request.body = nullptr;
      KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
      KJ_EXPECT(!contains(e.getDescription(), "without expectedBodySize"),
          "the error blames a missing expectedBodySize that was given", e.getDescription());
      KJ_EXPECT(contains(e.getDescription(), "declared 0 bytes"), e.getDescription());
      auto response = env.bounded(kj::mv(request.response));
      env.bounded(response.body->readAllText());
    }
  }
}

}  // namespace
}  // namespace sockfetch
