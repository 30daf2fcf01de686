// The errors a user can hit, one by one: for each, what triggers it (a bad setting, a misuse of
// the API, a misbehaving upstream or proxy, a lost connection), its kj::Exception::Type, and the
// key words of its message: what happened, who is to blame, and what to do.
//
// Only errors that no other suite already checks by message are here. Most were found wanting by
// an audit of every error the library raises (kj-http's words reaching the user, the wrong party
// blamed, no advice, the wrong type), and say what they said before where that helps.
//
// Everything runs over in-process pipes or loopback (127.0.0.1, unix sockets), every wait bounded.

#include "connector.h"
#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/fetcher-env.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <initializer_list>

namespace sockfetch {
namespace {

using Response = kj::HttpClient::Response;
using Type = kj::Exception::Type;
using test::contains;
using test::FetcherEnv;
using test::OK_HELLO;

// =================================================================================================
// Helpers

bool hasAll(const kj::Exception& e, std::initializer_list<kj::StringPtr> words) {
  for (auto word: words) {
    if (!contains(e.getDescription(), word)) return false;
  }
  return true;
}

#define EXPECT_ERROR(e, TYPE, ...) \
  do { \
    KJ_EXPECT((e).getType() == Type::TYPE, "wrong type", (e)); \
    KJ_EXPECT(hasAll((e), {__VA_ARGS__}), "message lacks key words", (e)); \
  } while (false)
// `e` has type TYPE and its message contains every one of the strings that follow.

template <typename Func>
kj::Exception thrownBy(Func&& func) {
  // What `func` throws; not throwing fails the test.
  KJ_IF_SOME(e, kj::runCatchingExceptions(kj::fwd<Func>(func))) {
    return kj::mv(e);
  }
  KJ_FAIL_ASSERT("expected an exception, but none was thrown");
}

kj::Exception nextRequestRefusal(FetcherEnv& env) {
  // A CLOSED fetcher refuses the next request at once: what it says.
  return thrownBy([&]() {
    env.fetcher->request(kj::HttpMethod::GET, "/next", env.headers());
  });
}

kj::Exception failedExchange(FetcherEnv& env, kj::StringPtr reply) {
  // A GET answered by `reply`, its body read to the end: why it failed (success fails the test).
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  auto sent = env.peer->sendLater(reply).eagerlyEvaluate([](kj::Exception&&) {});
  return env.failureOf(req.response.then([](Response&& r) {
    return r.body->readAllText().attach(kj::mv(r.body));
  }));
}

void readToEnd(FetcherEnv& env, kj::HttpClient::Request req, kj::StringPtr reply) {
  // Reads the request, answers `reply` and reads the response to its end (which must work).
  env.peer->readRequest();
  auto sent = env.peer->sendLater(reply).eagerlyEvaluate([](kj::Exception&&) {});
  auto r = env.bounded(kj::mv(req.response));
  env.bounded(r.body->readAllText());
}

struct LimitEnv: public FetcherEnv {
  // A fetcher over a pipe with the given response limits.
  explicit LimitEnv(ResponseFramer::Limits limits): FetcherEnv(false) {
    auto transport = test::pipeTransport();
    auto s = settings();
    s.limits = limits;
    fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), table, kj::mv(s));
    peer = kj::heap<test::Peer>(ws, kj::mv(transport.server));
  }
};

struct PoolEnv: public test::LoopEnv {
  // A ConnectionPool over pipes; each server end is a scripted Peer, which greets the client with
  // `greeting` (if set) as soon as the connection is made.
  kj::Vector<kj::Own<test::Peer>> peers;
  kj::Maybe<kj::StringPtr> greeting;
  kj::Own<kj::TaskSet::ErrorHandler> ignore = kj::heap<IgnoreErrors>();
  kj::TaskSet tasks{*ignore};
  kj::Own<ConnectionPool> pool;

  explicit PoolEnv(ConnectionPool::Settings settings = ConnectionPool::Settings()) {
    pool = kj::heap<ConnectionPool>(timer, table, [this]() {
      auto t = test::pipeTransport();
      auto peer = kj::heap<test::Peer>(ws, kj::mv(t.server));
      KJ_IF_SOME(g, greeting) {
        tasks.add(peer->sendLater(g));
      }
      peers.add(kj::mv(peer));
      return kj::Promise<kj::Own<kj::AsyncIoStream>>(kj::mv(t.client));
    }, kj::mv(settings));
  }
  ~PoolEnv() noexcept(false) {
    pool = nullptr;  // before the peers and the tasks writing to them
  }

  struct IgnoreErrors final: public kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&&) override {}
  };
};

struct ProxyEnv: public test::PipeProxyEnv {
  // tunnelConnector() through proxies on pipes: each connection's proxy end is a Peer.

  kj::Exception refusal(kj::StringPtr target, kj::StringPtr answer) {
    // Opens a tunnel to `target` through a proxy that answers CONNECT with `answer`.
    auto connector = tunnelConnector(toProxy(), target);
    auto tunnel = connector();
    auto head = proxies.back()->readHead();
    KJ_EXPECT(head.startsWith(kj::str("CONNECT ", target, " HTTP/1.1\r\n")), head);
    auto sent = proxies.back()->sendLater(answer).eagerlyEvaluate([](kj::Exception&&) {});
    return failureOf(kj::mv(tunnel));
  }
};

constexpr kj::StringPtr CHUNKED_HEAD = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"_kj;

// =================================================================================================
// StreamFetcher: an upstream that misbehaves

KJ_TEST("StreamFetcher: a server that closes without answering fails DISCONNECTED, saying so, "
    "and the next request names it") {
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->close();
  auto e = env.failureOf(kj::mv(req.response));
  EXPECT_ERROR(e, DISCONNECTED, "the server closed the connection without sending a response",
      "retry on a new connection");
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::FAILED, env.why());
  auto next = nextRequestRefusal(env);
  EXPECT_ERROR(next, DISCONNECTED, "without sending a response", "open a new connection");
}

KJ_TEST("StreamFetcher: each kind of malformed response fails FAILED, naming the fault and the "
    "upstream server, and the next request says why the connection was dropped") {
  struct Case {
    kj::StringPtr reply;
    kj::StringPtr fault;
  };
  Case cases[] = {
    {"HTTP/1.1 2OO OK\r\nContent-Length: 5\r\n\r\nhello"_kj, "invalid status line"_kj},
    {"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"_kj,
        "conflicting Content-Length"_kj},
    {"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello"_kj,
        "invalid Content-Length \"five\""_kj},
    {"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nNoColon\r\n\r\nhello"_kj,
        "header line without a colon"_kj},
    {"HTTP/1.1 200 OK\r\n: nameless\r\nContent-Length: 5\r\n\r\nhello"_kj,
        "header line without a name"_kj},
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n"_kj,
        "invalid chunk-size line"_kj},
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"_kj,
        "chunk data not followed by CRLF"_kj},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.fault);
    FetcherEnv env(false);
    auto e = failedExchange(env, c.reply);
    EXPECT_ERROR(e, FAILED, kj::str("the server sent a malformed HTTP response (", c.fault, ")"),
        "the connection was dropped, check the upstream server");
    KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::FAILED, env.why());
    auto next = nextRequestRefusal(env);
    EXPECT_ERROR(next, DISCONNECTED, "this StreamFetcher's connection was dropped because",
        c.fault, "open a new connection");
  }
}

KJ_TEST("StreamFetcher: on a wrapper stream, a request racing the server's close of the idle "
    "connection fails DISCONNECTED before writing, saying it is safe to retry") {
  FetcherEnv env(false, true);
  env.roundTrip();
  env.peer->close();
  // No turn of the event loop between the close and the request: the gate catches it.
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  auto e = env.failureOf(kj::mv(req.response));
  EXPECT_ERROR(e, DISCONNECTED,
      "the server closed the idle connection before the request was written",
      "retry on a new connection");
  KJ_EXPECT(!env.fetcher->lastExchangeWroteRequest());
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::PEER_CLOSED_IDLE);
}

KJ_TEST("StreamFetcher (TCP): an idle connection reset by the server refuses the next request "
    "DISCONNECTED, naming the reset and saying to open a new connection") {
  FetcherEnv env(true);
  env.roundTrip();
  test::resetConnection(*env.peer);
  env.settle();
  auto e = nextRequestRefusal(env);
  EXPECT_ERROR(e, DISCONNECTED, "this StreamFetcher's connection was dropped because",
      "the idle connection failed", "Connection reset by peer", "open a new connection");
}

// =================================================================================================
// StreamFetcher: every reason a connection is dropped reaches the next request's error

KJ_TEST("StreamFetcher: each reason for dropping the connection is named by the next request's "
    "DISCONNECTED error, which says to open a new connection") {
  using Kind = StreamFetcher::CloseKind;
  struct Case {
    kj::StringPtr what;
    Kind kind;
    kj::StringPtr reason;
    kj::Function<void(FetcherEnv&)> drive;
    bool tcp = false;
  };
  Case cases[] = {
    {"a cancelled request"_kj, Kind::ABANDONED,
        "a request was cancelled before its response arrived"_kj, [](FetcherEnv& env) {
      auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
      req.body = nullptr;
      env.peer->readRequest();
      auto dropped = kj::mv(req.response);
    }},
    {"a cancelled WebSocket handshake"_kj, Kind::ABANDONED,
        "a WebSocket handshake was cancelled before its response arrived"_kj,
        [](FetcherEnv& env) {
      auto dropped = env.fetcher->openWebSocket("/ws", env.headers());
    }},
    {"a response before the request was written"_kj, Kind::REQUEST_INCOMPLETE,
        "the response ended while part of the request was still being written"_kj,
        [](FetcherEnv& env) {
      // The server answers without reading a request head too large for the socket's buffers.
      auto url = kj::str("/", kj::repeat('u', 8 << 20));
      auto req = env.fetcher->request(kj::HttpMethod::GET, url, env.headers());
      req.body = nullptr;
      env.settle();
      auto sent = env.peer->sendLater(OK_HELLO).eagerlyEvaluate([](kj::Exception&&) {});
      auto r = env.bounded(kj::mv(req.response));
      env.bounded(r.body->readAllText());
    }, true},
    {"a chunked request body never finished"_kj, Kind::REQUEST_INCOMPLETE,
        "the response ended before the chunked request body was finished (drop the request "
        "body stream once it is written)"_kj, [](FetcherEnv& env) {
      auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers());
      env.peer->readHead();
      auto write = req.body->write("hello", 5);
      KJ_EXPECT(env.peer->readExactly(10) == "5\r\nhello\r\n");
      env.bounded(kj::mv(write));
      auto sent = env.peer->sendLater(OK_HELLO).eagerlyEvaluate([](kj::Exception&&) {});
      auto r = env.bounded(kj::mv(req.response));
      env.bounded(r.body->readAllText());
    }},
    {"bytes after the response"_kj, Kind::UNSOLICITED_BYTES,
        "the server sent 5 bytes after the end of the response, so the connection was dropped "
        "as poisoned"_kj, [](FetcherEnv& env) {
      readToEnd(env, env.fetcher->request(kj::HttpMethod::GET, "/", env.headers()),
          "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA");
    }},
    {"a 101 to a plain GET"_kj, Kind::UPGRADED,
        "the connection was upgraded to another protocol"_kj, [](FetcherEnv& env) {
      auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
      req.body = nullptr;
      env.peer->readRequest();
      auto sent = env.peer->sendLater("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
          "Connection: upgrade\r\n\r\n").eagerlyEvaluate([](kj::Exception&&) {});
      auto r = env.bounded(kj::mv(req.response));
      KJ_EXPECT(r.statusCode == 101);
    }},
    {"HTTP/1.0 without keep-alive"_kj, Kind::NOT_REUSABLE,
        "the server answered with HTTP/1.0 without `Connection: keep-alive`"_kj,
        [](FetcherEnv& env) {
      readToEnd(env, env.fetcher->request(kj::HttpMethod::GET, "/", env.headers()),
          "HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
    }},
    {"a trailer line that is too long"_kj, Kind::FAILED,
        "trailer line exceeds ResponseFramer::Limits::maxChunkLineBytes (4096)"_kj,
        [](FetcherEnv& env) {
      auto e = failedExchange(env, kj::str(CHUNKED_HEAD, "2\r\nok\r\n0\r\nX-T: ",
          kj::repeat('t', 5000), "\r\n\r\n"));
      EXPECT_ERROR(e, FAILED, "trailer line exceeds ResponseFramer::Limits::maxChunkLineBytes");
    }},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.what);
    FetcherEnv env(c.tcp);
    c.drive(env);
    KJ_EXPECT(env.fetcher->getCloseKind() == c.kind, env.fetcher->getCloseKind(), env.why());
    KJ_EXPECT(contains(env.why(), c.reason), env.why());
    auto e = nextRequestRefusal(env);
    EXPECT_ERROR(e, DISCONNECTED, "this StreamFetcher's connection was dropped because",
        c.reason, "; open a new connection (a ConnectionPool does this for you)");
  }
}

// =================================================================================================
// StreamFetcher: request bodies

KJ_TEST("StreamFetcher: after a write to the request body failed, the next write fails "
    "DISCONNECTED, naming the first failure and saying to send the request again") {
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(10));
  env.peer->readHead();
  env.peer->close();
  auto first = thrownBy([&]() { env.bounded(req.body->write("hello", 5)); });
  KJ_EXPECT(first.getType() == Type::DISCONNECTED, first);
  auto second = thrownBy([&]() { env.bounded(req.body->write("hello", 5)); });
  EXPECT_ERROR(second, DISCONNECTED, "an earlier write of this request body failed (",
      first.getDescription(), "), so the rest cannot follow it",
      "send the request again if it must reach the server");
}

KJ_TEST("StreamFetcher: a chunked body dropped with a write unfinished fails the response FAILED, "
    "saying to finish every write before dropping the body") {
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers());
  env.peer->readHead();
  {
    auto write = req.body->write("hello", 5);  // the peer does not read: it cannot finish
    KJ_EXPECT(!write.poll(env.ws));
  }
  req.body = nullptr;
  auto e = env.failureOf(kj::mv(req.response));
  EXPECT_ERROR(e, FAILED, "the chunked request body was dropped while a write to it was "
      "unfinished, so the request was never sent in full",
      "finish every write of the body", "before dropping the body stream");
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::ABANDONED, env.why());
}

// =================================================================================================
// ConnectionPool and connectors: settings and proxies

KJ_TEST("ConnectionPool: maxConnections = 0 is refused when the pool is made (FAILED), saying "
    "what it needs") {
  test::LoopEnv env;
  ConnectionPool::Settings settings;
  settings.maxConnections = 0;
  auto e = thrownBy([&]() {
    ConnectionPool pool(env.timer, env.table, []() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      return kj::NEVER_DONE;
    }, settings);
  });
  EXPECT_ERROR(e, FAILED, "ConnectionPool needs maxConnections >= 1");
}

KJ_TEST("tunnelConnector: a proxy answering CONNECT with 101 fails FAILED, saying it opens no "
    "tunnel and naming the answer") {
  ProxyEnv env;
  auto e = env.refusal("origin.test:443", "HTTP/1.1 101 Switching Protocols\r\n\r\n");
  EXPECT_ERROR(e, FAILED, "the proxy answered CONNECT to origin.test:443 with \"101 Switching "
      "Protocols\", which does not open a tunnel; check the proxy");
}

// =================================================================================================
// kj-http's own messages no longer reach the user

KJ_TEST("StreamFetcher: writing a body to a GET made without one says to pass expectedBodySize, "
    "as the pool does, not kj-http's \"HTTP message has no entity-body; can't write()\"") {
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  auto e = thrownBy([&]() { env.bounded(req.body->write("x", 1)); });
  EXPECT_ERROR(e, FAILED, "expectedBodySize");
}

KJ_TEST("a request body longer than expectedBodySize fails as a pool's buffered body does, not "
    "with kj-http's \"expected size <= length [4 <= 3]; overwrote Content-Length\" (StreamFetcher, "
    "and a pool's unbuffered body)") {
  {
    FetcherEnv env(false);
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(3));
    env.peer->readHead();
    auto e = thrownBy([&]() { env.bounded(req.body->write("abcd", 4)); });
    EXPECT_ERROR(e, FAILED, "longer than the declared 3 bytes", "expectedBodySize");
  }
  {
    ConnectionPool::Settings settings;
    settings.maxReplayBodyBytes = 0;  // streamed, not buffered
    PoolEnv env(settings);
    auto req = env.pool->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(3));
    auto e = thrownBy([&]() { env.bounded(req.body->write("abcd", 4)); });
    EXPECT_ERROR(e, FAILED, "longer than the declared 3 bytes", "expectedBodySize");
  }
}

KJ_TEST("a response with a transfer coding other than chunked alone fails FAILED in the library's "
    "words, naming the coding and what to configure, never kj-http's \"unknown transfer "
    "encoding\"") {
  // kj-http decodes `chunked` alone (not "gzip, chunked", which RFC 9112 allows); the framer
  // refuses the others first.
  for (auto coding: {"gzip"_kj, "gzip, chunked"_kj}) {
    FetcherEnv env(false);
    auto e = failedExchange(env,
        kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: ", coding, "\r\n\r\nhello"));
    EXPECT_ERROR(e, FAILED, "the server sent a response whose Transfer-Encoding (",
        kj::str("\"", coding, "\""), "configure the upstream server");
    KJ_EXPECT(!contains(e.getDescription(), "unknown transfer encoding"), e);
  }
}

KJ_TEST("a response repeating an identical Content-Length fails saying so, never with kj-http's "
    "\"invalid Content-Length header value; *cl = 5, 5\", a value the server never sent") {
  // kj-http joins the two lines and cannot read the list (RFC 9110 8.6 would let a recipient
  // accept it): the framer refuses it first.
  FetcherEnv env(false);
  auto e = failedExchange(env,
      "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello");
  EXPECT_ERROR(e, FAILED, "the server sent a malformed HTTP response (Content-Length sent more "
      "than once, which kj-http cannot read)");
  KJ_EXPECT(!contains(e.getDescription(), "5, 5"), e);
}

KJ_TEST("a response field kj-http refuses (a name that is no token, a NUL in a value) fails naming "
    "the field and the server, not with kj-http's \"protocolError.description = The headers sent "
    "by the server are not valid.\"") {
  struct Case {
    kj::StringPtr field;
    kj::StringPtr shown;
  };
  Case cases[] = {
    {"Bad Name: x"_kj, "invalid field name in \"Bad Name: x\""_kj},
    {"X-(paren): x"_kj, "invalid field name in \"X-(paren): x\""_kj},
    {kj::StringPtr("X-A: a\0b", 8), "a NUL byte in the field \"X-A: a\\x00b\""_kj},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.shown);
    FetcherEnv env(false);
    auto e = failedExchange(env,
        kj::str("HTTP/1.1 200 OK\r\n", c.field, "\r\nContent-Length: 5\r\n\r\nhello"));
    EXPECT_ERROR(e, FAILED, kj::str("the server sent a malformed HTTP response (", c.shown, ")"),
        "check the upstream server");
    KJ_EXPECT(!contains(e.getDescription(), "protocolError.description"), e);
    auto next = nextRequestRefusal(env);
    EXPECT_ERROR(next, DISCONNECTED, c.shown);
  }
}

// =================================================================================================
// Messages that blamed the wrong party, or advised the wrong thing

KJ_TEST("a POST whose server closes without answering is told to retry only if the request is "
    "safe to repeat: the server may have acted on it") {
  // As the framer's other truncation messages say; the pool never resends a POST that reached
  // the server.
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/pay", env.headers(), uint64_t(0));
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->close();
  auto e = env.failureOf(kj::mv(req.response));
  EXPECT_ERROR(e, DISCONNECTED, "without sending a response", "safe to repeat");
}

KJ_TEST("an upstream that is not HTTP (an SSH banner) fails FAILED once its first line is in, "
    "showing it and saying to check the address, without waiting for it to close") {
  // Retrying cannot help, so this is no "closed in the middle of the response head" inviting it.
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send("SSH-2.0-OpenSSH_9.2\r\n");  // and the server waits
  auto e = env.failureOf(kj::mv(req.response));
  EXPECT_ERROR(e, FAILED, "the server's answer is not HTTP/1.x (it began with "
      "\"SSH-2.0-OpenSSH_9.2\")", "check that the upstream address is an HTTP server");
}

KJ_TEST("ConnectionPool over pipes: an upstream that speaks first on every new connection fails, "
    "after the pool's one retry, saying it never should and to check the address, not to retry") {
  // The pool sends such a request once more (nothing was written, and a proxy that sent more than
  // its CONNECT answer would be healed by it); what it says when that fails too must not invite
  // another retry, nor speak of an idle connection: the connections were new.
  PoolEnv env;
  env.greeting = "SSH-2.0-OpenSSH_9.2\r\n"_kj;
  auto req = env.pool->request(kj::HttpMethod::GET, "/", env.headers());
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(env.pool->getStats().retries == 1, env.pool->getStats().retries);
  EXPECT_ERROR(e, DISCONNECTED, "before any request was sent on it (it began with \"S\"), which "
      "an HTTP/1.1 server never does; check that the upstream address is an HTTP server");
  KJ_EXPECT(!contains(e.getDescription(), "idle connection"), e);
  KJ_EXPECT(!contains(e.getDescription(), "retry"), e);
  KJ_EXPECT(!contains(e.getDescription(), "safe to send again"), e);
}

class BannerUpstream {
  // A loopback TCP server that greets every connection with a banner, as SSH and SMTP do.
public:
  explicit BannerUpstream(test::LoopEnv& env): tasks(errors) {
    auto& network = env.io.provider->getNetwork();
    listener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
    address = network.parseAddress("127.0.0.1", listener->getPort()).wait(env.ws);
    tasks.add(acceptLoop());
  }

  kj::Own<kj::NetworkAddress> address;

private:
  struct IgnoreErrors final: public kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&&) override {}
  } errors;
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Vector<kj::Own<kj::AsyncIoStream>> accepted;
  kj::TaskSet tasks;  // writes to `accepted`: declared after it

  kj::Promise<void> acceptLoop() {
    return listener->accept().then([this](kj::Own<kj::AsyncIoStream>&& stream) {
      tasks.add(writeAll(*stream, "SSH-2.0-OpenSSH_9.2\r\n"_kj.asBytes()));
      accepted.add(kj::mv(stream));
      return acceptLoop();
    });
  }
};

KJ_TEST("ConnectionPool over TCP: an upstream that speaks first on every new connection fails "
    "showing its banner, not \"...lost before the request was sent...; it is safe to send "
    "again\"") {
  // As above, with the kernel asked (MSG_PEEK): the error shows the banner's first line.
  test::LoopEnv env;
  BannerUpstream upstream(env);
  ConnectionPool pool(env.timer, env.table, [&]() {
    // The banner is there before the request goes out (a slow connect, say).
    return upstream.address->connect().then([&](kj::Own<kj::AsyncIoStream>&& stream) {
      return env.timer.afterDelay(20 * kj::MILLISECONDS)
          .then([stream = kj::mv(stream)]() mutable { return kj::mv(stream); });
    });
  });
  auto req = pool.request(kj::HttpMethod::GET, "/", env.headers());
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(pool.getStats().retries == 1, pool.getStats().retries);
  EXPECT_ERROR(e, DISCONNECTED, "(it began with \"SSH-2.0-OpenSSH_9.2\\r\\n\")",
      "check that the upstream address is an HTTP server");
  KJ_EXPECT(!contains(e.getDescription(), "safe to send again"), e);
  KJ_EXPECT(!contains(e.getDescription(), "idle connection"), e);
}

KJ_TEST("a response over a limit of the caller's (Limits::maxHeaderBytes, maxChunkLineBytes, "
    "maxTrailerBytes, maxInterimResponses) names the setting, and is not called malformed") {
  // The caller may be the one to change (maxHeaderBytes = 0 refuses every response).
  struct Case {
    kj::StringPtr setting;
    kj::Function<void(ResponseFramer::Limits&)> set;
    kj::String reply;
  };
  Case cases[] = {
    {"maxHeaderBytes"_kj, [](ResponseFramer::Limits& l) { l.maxHeaderBytes = 64; },
        kj::str("HTTP/1.1 200 OK\r\nX-Pad: ", kj::repeat('p', 100),
            "\r\nContent-Length: 0\r\n\r\n")},
    {"maxChunkLineBytes"_kj, [](ResponseFramer::Limits& l) { l.maxChunkLineBytes = 4; },
        kj::str(CHUNKED_HEAD, "0000000002\r\nok\r\n0\r\n\r\n")},
    {"maxTrailerBytes"_kj, [](ResponseFramer::Limits& l) { l.maxTrailerBytes = 0; },
        kj::str(CHUNKED_HEAD, "2\r\nok\r\n0\r\nX-T: y\r\n\r\n")},
    {"maxInterimResponses"_kj, [](ResponseFramer::Limits& l) { l.maxInterimResponses = 0; },
        kj::str("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.setting);
    ResponseFramer::Limits limits;
    c.set(limits);
    LimitEnv env(limits);
    auto e = failedExchange(env, c.reply);
    EXPECT_ERROR(e, FAILED, "the server's response is over a limit",
        kj::str("exceeds ResponseFramer::Limits::", c.setting), "raise the limit");
    KJ_EXPECT(!contains(e.getDescription(), "malformed"), e);
  }
}

KJ_TEST("a Content-Length of 19 digits (valid, below 2^64) is refused as too large, not invalid") {
  // The framer reads at most 18 digits.
  FetcherEnv env(false);
  auto e = failedExchange(env,
      "HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\nhello");
  EXPECT_ERROR(e, FAILED, "(Content-Length \"1234567890123456789\" is too large");
  KJ_EXPECT(!contains(e.getDescription(), "invalid Content-Length"), e);
}

KJ_TEST("(TCP) a connection reset in the middle of a response body says what it meant, as a cut by "
    "a FIN does, not only kj's \"::read(fd, buffer, maxBytes): Connection reset by peer\"") {
  FetcherEnv env(true);
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello");
  auto r = env.bounded(kj::mv(req.response));
  char buffer[16];
  KJ_EXPECT(env.read(*r.body, buffer, 5, 5) == 5);
  test::resetConnection(*env.peer);
  auto e = env.failureOf(r.body->readAllText());
  EXPECT_ERROR(e, DISCONNECTED, "the connection failed while the response was read (",
      "Connection reset by peer", "so the response is incomplete; retry on a new connection if "
      "the request is safe to repeat");
}

KJ_TEST("a request body write that failed (the connection was lost), then the body dropped, "
    "fails the response DISCONNECTED, not FAILED telling the caller to \"finish every write\"") {
  // The caller did write; the connection failed the write. DISCONNECTED, so that retry logic may
  // act on it.
  for (bool chunked: {false, true}) {
    KJ_CONTEXT(chunked);
    FetcherEnv env(false);
    auto req = chunked ? env.fetcher->request(kj::HttpMethod::POST, "/", env.headers())
                       : env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(),
                             uint64_t(10));
    env.peer->readHead();
    env.peer->close();
    auto write = thrownBy([&]() { env.bounded(req.body->write("hello", 5)); });
    KJ_EXPECT(write.getType() == Type::DISCONNECTED, write);
    req.body = nullptr;
    auto e = env.failureOf(kj::mv(req.response));
    KJ_EXPECT(e.getType() == Type::DISCONNECTED, e);
    KJ_EXPECT(!contains(e.getDescription(), "finish every write"), e);
  }
}

KJ_TEST("a chunked body read cancelled while the response's end was still arriving: the next read "
    "reports the end (the caller has the whole body), not \"the response body was already read "
    "to its end\", and the connection, whose end is no longer known, goes") {
  // The cancelled read may have taken bytes (the final CRLF) that are lost with it.
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send(kj::str(CHUNKED_HEAD, "2\r\nok\r\n0\r\n"));  // the final CRLF not yet
  auto r = env.bounded(kj::mv(req.response));
  char buffer[16];
  KJ_EXPECT(env.read(*r.body, buffer, 2, 2) == 2);
  {
    auto end = r.body->tryRead(buffer, 1, sizeof(buffer));
    KJ_EXPECT(!end.poll(env.ws));  // waits for the final CRLF; the caller gives up
  }
  auto rest = env.peer->sendLater("\r\n").eagerlyEvaluate([](kj::Exception&&) {});
  kj::String outcome;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
    outcome = kj::str(env.read(*r.body, buffer, 1, sizeof(buffer)));
  })) {
    outcome = kj::str(e);
  }
  KJ_EXPECT(outcome == "0", outcome);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::ABANDONED, env.why());
  KJ_EXPECT(contains(env.why(), "a read waiting for the end of the response was cancelled"),
      env.why());
}

KJ_TEST("release() on a CLOSED fetcher says there is no connection to give back, and why; not to "
    "\"wait until the response body in flight has been read to its end\", which will not help") {
  FetcherEnv env(false);
  readToEnd(env, env.fetcher->request(kj::HttpMethod::GET, "/", env.headers()),
      "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok");
  KJ_ASSERT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  auto e = thrownBy([&]() { env.fetcher->release(); });
  EXPECT_ERROR(e, FAILED, "release(): there is no connection to give back, it was dropped "
      "because the server sent `Connection: close`");
  KJ_EXPECT(!contains(e.getDescription(), "wait until"), e);
}

KJ_TEST("release() twice says the connection was already released, not to \"wait until the "
    "response body in flight has been read to its end\"") {
  FetcherEnv env(false);
  auto stream = env.fetcher->release();
  auto e = thrownBy([&]() { env.fetcher->release(); });
  EXPECT_ERROR(e, FAILED, "release() was already called", "make a new StreamFetcher over it");
  KJ_EXPECT(!contains(e.getDescription(), "wait until"), e);
}

KJ_TEST("a url with CR LF is refused at once, FAILED, nothing written, on a StreamFetcher and "
    "through a ConnectionPool: it would add headers (or a whole request) to the one sent") {
  // kj-http 0.9.2 writes the url into the request line unchecked, so
  // "/a HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /b" would reach the server as an injected header
  // and a second request.
  constexpr kj::StringPtr URL = "/a HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /b"_kj;
  {
    FetcherEnv env(false);
    kj::Maybe<kj::HttpClient::Request> sent;
    auto refused = kj::runCatchingExceptions([&]() {
      sent = env.fetcher->request(kj::HttpMethod::GET, URL, env.headers());
    });
    KJ_EXPECT(env.peer->readWouldBlock(), "the request was written");
    KJ_IF_SOME(e, refused) {
      EXPECT_ERROR(e, FAILED, "the request url", "contains a space or a control character",
          "percent-encode");
    } else {
      KJ_FAIL_EXPECT("StreamFetcher::request() accepted a url with CR LF");
    }
  }
  {
    PoolEnv env;
    kj::Maybe<kj::Exception> refusal;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
      auto req = env.pool->request(kj::HttpMethod::GET, URL, env.headers());
      req.body = nullptr;
      auto outcome = req.response.then([](Response&&) -> kj::Maybe<kj::Exception> {
        return nullptr;
      }, [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); })
          .eagerlyEvaluate(nullptr);
      env.settle();
      if (outcome.poll(env.ws)) refusal = outcome.wait(env.ws);
      for (auto& peer: env.peers) {
        KJ_EXPECT(peer->readWouldBlock(), "the request was written");
      }
    })) {
      refusal = kj::mv(e);
    }
    KJ_IF_SOME(e, refusal) {
      EXPECT_ERROR(e, FAILED, "the request url", "contains a space or a control character",
          "percent-encode");
    } else {
      KJ_FAIL_EXPECT("ConnectionPool::request() accepted a url with CR LF");
    }
  }
}

// =================================================================================================
// ConnectionPool and connector messages name the upstream (or proxy) and what to do

KJ_TEST("ConnectionPool: a refused connect names the address and what to check, not only kj's "
    "\"connect(): Connection refused\" (or \"No such file or directory\")") {
  // DISCONNECTED for 127.0.0.1:PORT (kj's type), FAILED for a unix socket that is not there.
  test::LoopEnv env;
  auto& network = env.io.provider->getNetwork();
  auto listener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
  auto port = listener->getPort();
  listener = nullptr;  // nothing listens there now
  auto closed = network.parseAddress("127.0.0.1", port).wait(env.ws);
  {
    ConnectionPool pool(env.timer, env.table, *closed);
    auto req = pool.request(kj::HttpMethod::GET, "/", env.headers());
    auto e = env.failureOf(kj::mv(req.response));
    EXPECT_ERROR(e, DISCONNECTED, kj::str("connecting to 127.0.0.1:", port, " failed ("),
        "Connection refused", "check that a server is running and listening at that address");
  }
  {
    auto missing = network.parseAddress("unix:/nonexistent-sockfetch-dir/upstream.sock")
        .wait(env.ws);
    ConnectionPool pool(env.timer, env.table, *missing);
    auto req = pool.request(kj::HttpMethod::GET, "/", env.headers());
    auto e = env.failureOf(kj::mv(req.response));
    EXPECT_ERROR(e, FAILED, "/nonexistent-sockfetch-dir/upstream.sock",
        "check that a server is running and listening at that address");
  }
}

KJ_TEST("ConnectionPool: \"connecting to the upstream timed out after 20 ms\" says what to do: "
    "check the upstream, or raise connectTimeout") {
  test::LoopEnv env;
  ConnectionPool::Settings settings;
  settings.connectTimeout = 20 * kj::MILLISECONDS;
  ConnectionPool pool(env.timer, env.table, []() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    return kj::NEVER_DONE;
  }, settings);
  auto req = pool.request(kj::HttpMethod::GET, "/", env.headers());
  auto e = env.failureOf(kj::mv(req.response));
  // OVERLOADED, as kj's own timeouts (kj::HttpServer answers it with a 503; a DISCONNECTED
  // would close the client's connection without an answer).
  EXPECT_ERROR(e, OVERLOADED, "timed out after 20 ms", "connectTimeout");
}

KJ_TEST("ConnectionPool destroyed under a waiting request: \"the ConnectionPool was destroyed "
        "while "
    "this request was waiting for a connection\" says to keep the pool alive") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  PoolEnv env(settings);
  auto first = env.pool->request(kj::HttpMethod::GET, "/first", env.headers());
  env.settle();
  auto second = env.pool->request(kj::HttpMethod::GET, "/second", env.headers());
  env.settle();
  KJ_ASSERT(env.pool->getWaitingCount() == 1);
  env.pool = nullptr;
  auto e = env.failureOf(kj::mv(second.response));
  EXPECT_ERROR(e, DISCONNECTED, "destroyed while this request was waiting", "alive");
}

KJ_TEST("ConnectionPool destroyed while a buffered body was written: \"the ConnectionPool was "
    "destroyed before this request could be sent\" says to keep the pool alive") {
  PoolEnv env;
  auto req = env.pool->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(3));
  env.bounded(req.body->write("ab", 2));
  env.pool = nullptr;
  env.bounded(req.body->write("c", 1));
  auto e = env.failureOf(kj::mv(req.response));
  EXPECT_ERROR(e, DISCONNECTED, "destroyed before this request could be sent", "alive");
}

KJ_TEST("ConnectionPool: a buffered body dropped short fails saying nothing was sent and what to "
    "do, as the StreamFetcher's equivalent does") {
  PoolEnv env;
  auto req = env.pool->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(10));
  env.bounded(req.body->write("abc", 3));
  req.body = nullptr;
  auto e = env.failureOf(kj::mv(req.response));
  EXPECT_ERROR(e, FAILED, "dropped after 3 of its 10 bytes", "expectedBodySize");
}

KJ_TEST("ConnectionPool: writing a streamed body after dropping the response promise fails "
    "saying the promise was dropped, and to keep it, not that \"the request was cancelled\"") {
  // The caller never cancelled anything knowingly: it dropped the response promise.
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  PoolEnv env(settings);
  auto first = env.pool->request(kj::HttpMethod::GET, "/first", env.headers());
  env.settle();
  auto req = env.pool->request(kj::HttpMethod::POST, "/", env.headers());  // streamed (chunked)
  auto write = req.body->write("abc", 3);
  { auto dropped = kj::mv(req.response); }
  auto e = thrownBy([&]() { env.bounded(kj::mv(write)); });
  EXPECT_ERROR(e, DISCONNECTED, "the response promise was dropped before a connection carried "
      "the request body; keep the response promise until the body is written");
}

KJ_TEST("tunnelConnector refuses a target without a port at once, as it does an empty one; a "
    "proxy would answer 400, which read like its access rules refusing") {
  // CONNECT needs host:port (RFC 9110 9.3.6).
  ProxyEnv env;
  auto e = thrownBy([&]() { tunnelConnector(env.toProxy(), "origin.test"); });
  EXPECT_ERROR(e, FAILED, "host:port, with a port number");
  for (auto bad: {"origin.test:"_kj, ":443"_kj, "origin.test:https"_kj, "[::1]"_kj,
                  "origin.test:123456"_kj}) {
    auto refused = thrownBy([&]() { tunnelConnector(env.toProxy(), bad); });
    EXPECT_ERROR(refused, FAILED, "host:port");
  }
  for (auto good: {"origin.test:443"_kj, "[::1]:8443"_kj, "10.0.0.1:1"_kj}) {
    tunnelConnector(env.toProxy(), good);  // accepted (and not called)
  }
  KJ_EXPECT(env.calls == 0);
}

KJ_TEST("tunnelConnector: a proxy's 502 (it could not reach the target) is not blamed on \"the "
    "proxy's access rules and credentials\"") {
  // Only 401/403/407 are about access; 502/504 say the proxy could not reach the target.
  ProxyEnv env;
  auto e = env.refusal("origin.test:443", "HTTP/1.1 502 Bad Gateway\r\n\r\n");
  EXPECT_ERROR(e, DISCONNECTED, "the proxy could not reach origin.test:443 (\"502 Bad Gateway\"); "
      "check that the target is up and reachable from the proxy");
  KJ_EXPECT(!contains(e.getDescription(), "access rules and credentials"), e);
  // A refusal is still one.
  auto refused = env.refusal("origin.test:443", "HTTP/1.1 403 Forbidden\r\n\r\n");
  EXPECT_ERROR(refused, FAILED, "check the proxy's access rules and credentials");
}

KJ_TEST("tunnelConnector: a proxy's 503 (temporarily unavailable) is OVERLOADED, not FAILED, which "
    "retry logic takes as permanent") {
  // 503 means "try later": OVERLOADED (which kj's HttpServer turns back into 503; FAILED becomes a
  // 500).
  ProxyEnv env;
  auto e = env.refusal("origin.test:443", "HTTP/1.1 503 Service Unavailable\r\n\r\n");
  EXPECT_ERROR(e, OVERLOADED, "503 Service Unavailable");
}

KJ_TEST("tunnelConnector: a proxy connection that fails before the answer says so, with kj's "
    "reason, and what to check, as every other proxy error does") {
  test::LoopEnv env;
  auto connector = tunnelConnector([]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    auto t = test::pipeTransport();
    t.server = nullptr;  // the proxy is gone at once
    return kj::mv(t.client);
  }, "origin.test:443");
  auto e = env.failureOf(connector());
  EXPECT_ERROR(e, DISCONNECTED, "the connection to the proxy failed before it answered CONNECT "
      "origin.test:443 (", "); check that the proxy is up and reachable");
}

}  // namespace
}  // namespace sockfetch
