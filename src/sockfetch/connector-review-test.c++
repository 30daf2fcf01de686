// An operator's review of where ConnectionPool connects to: real loopback addresses and the
// failures of opening a connection. Covered here and nowhere else:
//  - a unix-domain socket upstream ("unix:/path") as a pool's address: reuse, the server closing
//    an idle connection (noticed before it is handed out) and bytes it sends while idle;
//  - kj's "unix-abstract:" addresses: served, and a refusal naming the address;
//  - a name kj resolves ("localhost", from /etc/hosts): served, a refusal naming what it gave;
//  - a server that accepts and at once closes (FIN) or resets (RST) a fresh connection: the
//    request fails clearly after one retry at most, and nothing leaks;
//  - a server that accepts and never answers: the waiter behind it times out (waitTimeout), the
//    request in flight is untouched, and the pool works again once the server answers; the
//    wait timeout's wording;
//  - descriptor exhaustion (RLIMIT_NOFILE lowered in this process, then restored): a connect
//    that finds no descriptor fails at once and clearly, an idle connection is still served, and
//    the pool recovers once descriptors are free, leaking none; what the error advises;
//  - a pool over a CONNECT tunnel whose proxy is slow or stops in the middle of its answer: the
//    connect timeout's wording.
// Loopback only (127.0.0.1, unix sockets); every wait is bounded.

#include "connector.h"
#include "pool.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

namespace sockfetch {
namespace {

using test::contains;
using test::ok;
using test::Peer;
using test::ScriptedServer;
using Reply = ScriptedServer::Reply;
using Type = kj::Exception::Type;

constexpr kj::StringPtr OK_HELLO = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj;

unsigned openFds() {
  unsigned n = 0;
  DIR* dir = opendir("/proc/self/fd");
  KJ_ASSERT(dir != nullptr);
  while (readdir(dir) != nullptr) ++n;
  closedir(dir);
  return n;
}

int highestFd() {
  int highest = -1;
  DIR* dir = opendir("/proc/self/fd");
  KJ_ASSERT(dir != nullptr);
  while (auto entry = readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    highest = kj::max(highest, atoi(entry->d_name));
  }
  closedir(dir);
  return highest;
}

class DescriptorsExhausted {
  // Lowers this process's RLIMIT_NOFILE to just above its highest open descriptor and fills every
  // free one below, so that the next socket() fails with EMFILE; free() undoes both.
public:
  DescriptorsExhausted() {
    KJ_SYSCALL(getrlimit(RLIMIT_NOFILE, &saved));
    struct rlimit lowered = saved;
    lowered.rlim_cur = highestFd() + 1;
    KJ_SYSCALL(setrlimit(RLIMIT_NOFILE, &lowered));
    for (;;) {
      int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        KJ_ASSERT(errno == EMFILE, errno);
        break;
      }
      fillers.add(fd);
    }
  }
  ~DescriptorsExhausted() { free(); }
  void free() {
    if (done) return;
    done = true;
    for (int fd: fillers) close(fd);
    fillers.clear();
    KJ_SYSCALL(setrlimit(RLIMIT_NOFILE, &saved));
  }

private:
  struct rlimit saved;
  kj::Vector<int> fillers;
  bool done = false;
};

kj::String bodyOf(test::LoopEnv& env, kj::HttpClient::Response&& response) {
  return env.bounded(response.body->readAllText());
}

kj::String get(test::LoopEnv& env, kj::HttpClient& client, kj::StringPtr path) {
  auto h = env.headers();
  auto req = client.request(kj::HttpMethod::GET, path, h);
  auto response = env.bounded(kj::mv(req.response));
  KJ_EXPECT(response.statusCode == 200, response.statusCode);
  return bodyOf(env, kj::mv(response));
}

ScriptedServer::Handler echoPath() {
  return [](unsigned, unsigned, kj::StringPtr text) -> Reply {
    return ok(test::pathOf(text));
  };
}

// =================================================================================================
// Unix-domain sockets

KJ_TEST("unix socket upstream: one connection serves every request in turn, reused") {
  // Contract: a pool over "unix:/path" reuses its connection as over TCP (the idle watch and the
  // direct write work on any stream socket).
  test::LoopEnv env;
  ScriptedServer server(env.io, "unix", echoPath());
  auto address = server.address();
  KJ_EXPECT(address->toString().startsWith("unix:"), address->toString());
  ConnectionPool pool(env.timer, env.table, *address);
  for (auto path: {"/a"_kj, "/b"_kj, "/c"_kj}) {
    KJ_EXPECT(get(env, pool, path) == path);
    env.settle(5 * kj::MILLISECONDS);
  }
  KJ_EXPECT(server.accepted == 1, server.accepted);
  auto& s = pool.getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 2 && s.dropped() == 0, s.reuses, s.dropped());
  KJ_EXPECT(server.pipelined == 0);
}

KJ_TEST("unix socket upstream: an idle connection the server closed is noticed before it is "
    "handed out; one it wrote to while idle is dropped as poisoned, never read as a response") {
  // Contract: both idle losses are seen on a unix socket too, each counted under its own reason,
  // and the next request goes out on a fresh connection, without a retry.
  test::LoopEnv env;
  ScriptedServer server(env.io, "unix", [](unsigned connection, unsigned, kj::StringPtr text) {
    auto reply = ok(kj::str(connection, test::pathOf(text)));
    if (connection == 1) reply.thenUnsolicited = kj::str(OK_HELLO);
    return reply;
  });
  auto address = server.address();
  ConnectionPool pool(env.timer, env.table, *address);
  KJ_EXPECT(get(env, pool, "/a") == "0/a");
  env.settle();
  server.closeIdleConnections();
  env.waitFor([&]() { return pool.getIdleCount() == 0; });
  KJ_EXPECT(pool.getStats().droppedPeerClosedIdle == 1, pool.getStats().droppedPeerClosedIdle);
  KJ_EXPECT(get(env, pool, "/b") == "1/b");
  env.waitFor([&]() { return pool.getIdleCount() == 0; });
  KJ_EXPECT(pool.getStats().droppedUnsolicitedBytes == 1,
      pool.getStats().droppedUnsolicitedBytes);
  KJ_EXPECT(get(env, pool, "/c") == "2/c");
  auto& s = pool.getStats();
  KJ_EXPECT(s.connectionsOpened == 3 && s.retries == 0 && s.reuses == 0, s.connectionsOpened,
      s.retries, s.reuses);
}

KJ_TEST("unix-abstract: upstream: served through the pool; a refusal names the address and what "
    "to check") {
  // Contract: any address kj's parseAddress() yields works (connector.h), and a failed connect
  // names it (DISCONNECTED for a refusal).
  test::LoopEnv env;
  auto& network = env.io.provider->getNetwork();
  auto name = kj::str("unix-abstract:sockfetch-review-", getpid());
  auto listenAt = network.parseAddress(name).wait(env.ws);
  auto listener = listenAt->listen();
  auto serve = listener->accept().then([&](kj::Own<kj::AsyncIoStream>&& stream) {
    auto peer = kj::heap<Peer>(env.ws, kj::mv(stream));
    return peer;
  });
  auto address = network.parseAddress(name).wait(env.ws);
  {
    ConnectionPool pool(env.timer, env.table, *address);
    auto h = env.headers();
    auto req = pool.request(kj::HttpMethod::GET, "/x", h);
    auto peer = env.bounded(kj::mv(serve));
    KJ_EXPECT(peer->readRequest().startsWith("GET /x HTTP/1.1\r\n"));
    peer->send(OK_HELLO);
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(bodyOf(env, kj::mv(response)) == "hello");
  }
  listener = nullptr;
  ConnectionPool pool(env.timer, env.table, *address);
  auto h = env.headers();
  auto req = pool.request(kj::HttpMethod::GET, "/", h);
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), kj::str("connecting to ", address->toString())), e);
  KJ_EXPECT(contains(e.getDescription(), "sockfetch-review-"), e);
  KJ_EXPECT(contains(e.getDescription(), "check that a server is running"), e);
  KJ_EXPECT(pool.getStats().connectFailures == 1 && pool.getOpenCount() == 0);
}


// =================================================================================================
// A name that resolves

KJ_TEST("a name resolved by kj (\"localhost\"): the pool serves through every address it gives, "
    "whatever their order, and a refusal names what it resolved to") {
  // Contract: any address parseAddress() yields works (connector.h). "localhost" resolves from
  // /etc/hosts, with no network; where it gives ::1 before 127.0.0.1 and the server listens on
  // 127.0.0.1 only, kj tries the next address, and the pool still gets one connection.
  test::LoopEnv env;
  ScriptedServer server(env.io, "127.0.0.1", echoPath());
  auto serverAt = server.address()->toString();
  KJ_ASSERT(serverAt.startsWith("127.0.0.1:"), serverAt);
  auto port = serverAt.slice(strlen("127.0.0.1:"));
  auto& network = env.io.provider->getNetwork();
  auto address = network.parseAddress(kj::str("localhost:", port)).wait(env.ws);
  {
    ConnectionPool pool(env.timer, env.table, *address);
    KJ_EXPECT(get(env, pool, "/one") == "/one");
    env.settle(5 * kj::MILLISECONDS);
    KJ_EXPECT(get(env, pool, "/two") == "/two");
    KJ_EXPECT(pool.getStats().connectionsOpened == 1 && pool.getStats().reuses == 1);
  }
  auto listener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
  auto freePort = listener->getPort();
  listener = nullptr;
  auto refusing = network.parseAddress("localhost", freePort).wait(env.ws);
  ConnectionPool pool(env.timer, env.table, *refusing);
  auto h = env.headers();
  auto req = pool.request(kj::HttpMethod::GET, "/", h);
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), kj::str("connecting to ", refusing->toString())), e);
  KJ_EXPECT(contains(e.getDescription(), kj::str(":", freePort)), e);
  KJ_EXPECT(pool.getStats().connectFailures == 1 && pool.getOpenCount() == 0);
}

// =================================================================================================
// A server that accepts and at once closes or resets, or never answers

struct Outcome {
  kj::Exception failure;
  ConnectionPool::Stats stats;
  unsigned connects;
  kj::String address;
};

class ClosingServerAddress final: public kj::NetworkAddress {
  // A real loopback address whose server accepts each connection and at once closes (FIN) or
  // resets (RST) it; connect() yields the client's stream only once that reached it, so that the
  // pool's request meets a just-opened connection that is already over, deterministically (a
  // server at its own connection limit, or a firewall, does this to every connection).
public:
  ClosingServerAddress(test::LoopEnv& env, kj::NetworkAddress& inner,
      kj::ConnectionReceiver& listener, bool reset)
      : env(env), inner(inner), listener(listener), reset(reset) {}
  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() override {
    ++connects;
    return inner.connect().then([this](kj::Own<kj::AsyncIoStream>&& client) {
      return listener.accept().then([this, client = kj::mv(client)](
          kj::Own<kj::AsyncIoStream>&& server) mutable {
        Peer peer(env.ws, kj::mv(server));
        if (reset) test::resetConnection(peer); else peer.close();
        return env.timer.afterDelay(20 * kj::MILLISECONDS).then(
            [client = kj::mv(client)]() mutable { return kj::mv(client); });
      });
    });
  }
  kj::Own<kj::ConnectionReceiver> listen() override { KJ_UNIMPLEMENTED("listen"); }
  kj::Own<kj::NetworkAddress> clone() override { KJ_UNIMPLEMENTED("clone"); }
  kj::String toString() override { return inner.toString(); }
  unsigned connects = 0;

private:
  test::LoopEnv& env;
  kj::NetworkAddress& inner;
  kj::ConnectionReceiver& listener;
  bool reset;
};

Outcome acceptThenEnd(bool reset) {
  test::LoopEnv env;
  auto& network = env.io.provider->getNetwork();
  auto fdsBefore = openFds();
  kj::Maybe<Outcome> outcome;
  {
    auto listener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
    auto address = network.parseAddress("127.0.0.1", listener->getPort()).wait(env.ws);
    ClosingServerAddress closing(env, *address, *listener, reset);
    ConnectionPool scripted(env.timer, env.table, closing);
    auto h = env.headers();
    auto req = scripted.request(kj::HttpMethod::GET, "/", h);
    auto e = env.failureOf(kj::mv(req.response));
    for (int i = 0; i < 3; i++) kj::evalLater([]() {}).wait(env.ws);
    KJ_EXPECT(scripted.getOpenCount() == 0, scripted.getOpenCount());
    outcome = Outcome{kj::mv(e), scripted.getStats(), closing.connects, address->toString()};
  }
  KJ_EXPECT(openFds() == fdsBefore, "a descriptor leaked", fdsBefore, openFds());
  return KJ_ASSERT_NONNULL(kj::mv(outcome));
}

void expectFailedOnceMore(const Outcome& o, kj::StringPtr word) {
  // Contract: DISCONNECTED (the connection was lost), saying the server closed or reset it. The
  // connection was found lost before the request was written, so the pool may send it once more
  // on a new connection (mayRetry(): it never reached the connection), and only once: two
  // connections, each counted once as dropped, no connect failure.
  KJ_EXPECT(o.failure.getType() == Type::DISCONNECTED, o.failure);
  KJ_EXPECT(contains(o.failure.getDescription(), word), o.failure);
  KJ_EXPECT(o.connects == 2, o.connects);
  KJ_EXPECT(o.stats.connectionsOpened == 2 && o.stats.retries == 1 &&
      o.stats.connectFailures == 0 && o.stats.dropped() == 2, o.stats.connectionsOpened,
      o.stats.retries, o.stats.connectFailures, o.stats.dropped());
}

KJ_TEST("a server that accepts and closes at once (FIN): the request fails DISCONNECTED saying the "
    "server closed, is sent once more only, each connection counted, no descriptor left") {
  // Contract: see expectFailedOnceMore(): failed clearly, sent once more at most, nothing leaked.
  expectFailedOnceMore(acceptThenEnd(false), "closed");
}

KJ_TEST("a server that accepts and resets at once (RST): the request fails DISCONNECTED saying the "
    "connection was reset, is sent once more only, each connection counted, no descriptor left") {
  // Contract: see expectFailedOnceMore(): failed clearly, sent once more at most, nothing leaked.
  expectFailedOnceMore(acceptThenEnd(true), "reset");
}

KJ_TEST("a server that closes every new connection at once: after the pool's own resend failed "
    "too, the error names the address and says new connections were lost, without advising to "
    "send again, and the stats count new connections closed, not idle ones") {
  // Contract: each connection the pool opens is closed by the server (FIN, then separately RST)
  // before the pool's request is written; the pool sends the request once more on a second new
  // connection, which meets the same. The error says what happened (a new connection to
  // 127.0.0.1:P was lost before any request was sent on it) and what to do (check that the
  // upstream accepts connections and keeps them open), not "safe to send again" (the pool just
  // did) nor "idle" (a keep-alive timeout matter); the drops count as droppedPeerClosedNew.
  for (bool reset: {false, true}) {
    auto o = acceptThenEnd(reset);
    auto text = o.failure.getDescription();
    KJ_EXPECT(contains(text, o.address), "names no address", reset, o.failure);
    KJ_EXPECT(!contains(text, "idle"), "a just-opened connection called idle", reset, o.failure);
    KJ_EXPECT(!contains(text, "safe to send again"),
        "advises sending again after the pool's own resend failed", reset, o.failure);
    KJ_EXPECT(o.stats.droppedPeerClosedIdle == 0, "counted as idle connections closed",
        o.stats.droppedPeerClosedIdle, reset);
    KJ_EXPECT(contains(text, "new connection"), reset, o.failure);
    KJ_EXPECT(o.stats.droppedPeerClosedNew == 2, o.stats.droppedPeerClosedNew, reset);
  }
}

KJ_TEST("a server that accepts and does not answer: the waiter behind it times out (waitTimeout), "
    "the request in flight is untouched and its answer, when it comes, is read and reused") {
  // Contract (pool.h): waitTimeout bounds the wait for a connection; connectTimeout only the
  // connect, which succeeded here. The slow request is not failed by either.
  test::LoopEnv env;
  ScriptedServer server(env.io, "127.0.0.1", [](unsigned, unsigned request, kj::StringPtr text) {
    auto reply = ok(test::pathOf(text));
    if (request == 0) reply.delay = 300 * kj::MILLISECONDS;
    return reply;
  });
  auto address = server.address();
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  settings.waitTimeout = 50 * kj::MILLISECONDS;
  settings.connectTimeout = 50 * kj::MILLISECONDS;
  ConnectionPool pool(env.timer, env.table, *address, settings);
  auto h = env.headers();
  auto slow = pool.request(kj::HttpMethod::GET, "/slow", h);
  env.settle(5 * kj::MILLISECONDS);
  auto waiting = pool.request(kj::HttpMethod::GET, "/waiting", h);
  auto e = env.failureOf(kj::mv(waiting.response));
  KJ_EXPECT(e.getType() == Type::OVERLOADED, e);
  KJ_EXPECT(contains(e.getDescription(), "waited 50 ms for a free connection"), e);
  auto response = env.bounded(kj::mv(slow.response));
  KJ_EXPECT(bodyOf(env, kj::mv(response)) == "/slow");
  env.settle(5 * kj::MILLISECONDS);
  KJ_EXPECT(get(env, pool, "/next") == "/next");
  auto& s = pool.getStats();
  KJ_EXPECT(s.overloaded == 1 && s.connectionsOpened == 1 && s.reuses == 1 && s.dropped() == 0,
      s.overloaded, s.connectionsOpened, s.reuses, s.dropped());
  KJ_EXPECT(server.accepted == 1);
}

KJ_TEST("a request that waited for a connection and got none is told so naming the upstream of "
    "the pool's address") {
  // Contract: every user-facing error names the address, as the connect timeout and a refused
  // connect of an address pool do ("connecting to the upstream (127.0.0.1:P) timed out"): the
  // waitTimeout failure names 127.0.0.1:P too, so that an operator with several pools (one per
  // upstream) knows which is saturated.
  test::LoopEnv env;
  ScriptedServer server(env.io, "127.0.0.1", [](unsigned, unsigned, kj::StringPtr text) {
    auto reply = ok(test::pathOf(text));
    reply.delay = 200 * kj::MILLISECONDS;
    return reply;
  });
  auto address = server.address();
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  settings.waitTimeout = 50 * kj::MILLISECONDS;
  ConnectionPool pool(env.timer, env.table, *address, settings);
  auto h = env.headers();
  auto slow = pool.request(kj::HttpMethod::GET, "/slow", h);
  env.settle(5 * kj::MILLISECONDS);
  auto waiting = pool.request(kj::HttpMethod::GET, "/waiting", h);
  auto e = env.failureOf(kj::mv(waiting.response));
  KJ_EXPECT(e.getType() == Type::OVERLOADED, e);
  KJ_EXPECT(contains(e.getDescription(), address->toString()),
      "the wait timeout does not name the upstream", e);
  env.bounded(kj::mv(slow.response));
}

// =================================================================================================
// Descriptor exhaustion

KJ_TEST("no descriptor left: a new connection fails at once, OVERLOADED, naming the address and "
    "\"Too many open files\"; an idle connection is still served; the pool recovers after, "
    "leaking no descriptor") {
  // Contract: a connect failure fails that request only, with the connector's error naming the
  // address; it is counted (connectFailures), leaves no slot taken; once descriptors are free
  // again, new connections open. EMFILE is kj's OVERLOADED (temporarily out of a resource).
  test::LoopEnv env;
  ScriptedServer server(env.io, "127.0.0.1", echoPath());
  auto address = server.address();
  env.settle(5 * kj::MILLISECONDS);
  auto fdsBefore = openFds();
  {
    ConnectionPool pool(env.timer, env.table, *address);
    auto h = env.headers();
    auto held = pool.request(kj::HttpMethod::GET, "/held", h);
    auto heldResponse = env.bounded(kj::mv(held.response));  // busy: its body is not read yet
    KJ_EXPECT(get(env, pool, "/idle") == "/idle");           // opens a second, left idle
    env.settle(5 * kj::MILLISECONDS);
    KJ_ASSERT(pool.getOpenCount() == 2 && pool.getIdleCount() == 1);
    {
      DescriptorsExhausted exhausted;
      // The idle connection needs no descriptor.
      KJ_EXPECT(get(env, pool, "/reused") == "/reused");
      // The busy one is, so a third request needs a new connection, and none can be made.
      auto one = pool.request(kj::HttpMethod::GET, "/one", h);
      auto two = pool.request(kj::HttpMethod::GET, "/two", h);
      auto e = env.failureOf(kj::mv(two.response));
      KJ_EXPECT(e.getType() == Type::OVERLOADED, e);
      KJ_EXPECT(contains(e.getDescription(), kj::str("connecting to ", address->toString())), e);
      KJ_EXPECT(contains(e.getDescription(), "Too many open files"), e);
      // (`one` took the idle connection.)
      auto first = env.bounded(kj::mv(one.response));
      KJ_EXPECT(bodyOf(env, kj::mv(first)) == "/one");
      KJ_EXPECT(pool.getStats().connectFailures == 1, pool.getStats().connectFailures);
      KJ_EXPECT(pool.getOpenCount() == 2, pool.getOpenCount());
      exhausted.free();
    }
    KJ_EXPECT(bodyOf(env, kj::mv(heldResponse)) == "/held");
    // Both busy again, the third request opens a new connection now that it can.
    auto a = pool.request(kj::HttpMethod::GET, "/a", h);
    auto b = pool.request(kj::HttpMethod::GET, "/b", h);
    auto c = pool.request(kj::HttpMethod::GET, "/c", h);
    for (auto* r: {&a, &b, &c}) env.bounded(kj::mv(r->response));
    KJ_EXPECT(pool.getStats().connectionsOpened == 3, pool.getStats().connectionsOpened);
    KJ_EXPECT(pool.getStats().connectFailures == 1);
  }
  env.settle();
  KJ_EXPECT(openFds() == fdsBefore, "a descriptor leaked", fdsBefore, openFds());
}

KJ_TEST("a connect that failed for want of a descriptor (EMFILE) points the operator at this "
    "process's descriptor limit, not at the server") {
  // Contract: every error says what happened and what to do: here that this process has no
  // descriptor left (raise the limit, or lower maxConnections / maxIdleConnections), not "check
  // that a server is running", which would send the operator the wrong way.
  test::LoopEnv env;
  ScriptedServer server(env.io, "127.0.0.1", echoPath());
  auto address = server.address();
  ConnectionPool pool(env.timer, env.table, *address);
  auto h = env.headers();
  kj::Maybe<kj::Exception> failure;
  {
    DescriptorsExhausted exhausted;
    auto req = pool.request(kj::HttpMethod::GET, "/", h);
    failure = env.failureOf(kj::mv(req.response));
  }
  auto& e = KJ_ASSERT_NONNULL(failure);
  KJ_EXPECT(contains(e.getDescription(), "Too many open files"), e);
  KJ_EXPECT(!contains(e.getDescription(), "check that a server is running"),
      "EMFILE blamed on the server", e);
  KJ_EXPECT(contains(e.getDescription(), "descriptor"), "no word on descriptors", e);
  KJ_EXPECT(get(env, pool, "/after") == "/after");
}

// =================================================================================================
// A pool over a CONNECT tunnel whose proxy is slow or stops half way

KJ_TEST("a pool over a tunnel whose proxy stops half way through its answer times out naming "
    "the upstream as Settings::upstreamName gives it; the half-open tunnel is closed") {
  // Contract: errors name the upstream. A pool made from a Connector knows no address; the
  // caller names it (Settings::upstreamName, copied by the pool). A proxy that accepted, read
  // the CONNECT and sent "HTTP/1.1 200 Conn" then nothing: the connect timeout names the tunnel's
  // target and proxy, one connect failure is counted, and no descriptor is left.
  test::LoopEnv env;
  auto& network = env.io.provider->getNetwork();
  auto listener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
  auto proxyAddress = network.parseAddress("127.0.0.1", listener->getPort()).wait(env.ws);
  auto fdsBefore = openFds();
  {
    ConnectionPool::Settings settings;
    settings.connectTimeout = 50 * kj::MILLISECONDS;
    auto name = kj::str("origin.test:8443 through ", proxyAddress->toString());
    settings.upstreamName = name;
    ConnectionPool pool(env.timer, env.table,
        tunnelConnector(addressConnector(*proxyAddress), "origin.test:8443"), settings);
    name = nullptr;  // (the pool keeps its own copy)
    auto h = env.headers();
    auto req = pool.request(kj::HttpMethod::GET, "/", h);
    auto proxy = kj::heap<Peer>(env.ws, env.bounded(listener->accept()));
    KJ_EXPECT(proxy->readHead().startsWith("CONNECT origin.test:8443 HTTP/1.1\r\n"));
    proxy->send("HTTP/1.1 200 Conn");
    auto e = env.failureOf(kj::mv(req.response));
    KJ_EXPECT(e.getType() == Type::OVERLOADED, e);
    KJ_EXPECT(proxy->sawEof(), "the half-open tunnel was left open");
    KJ_EXPECT(pool.getStats().connectFailures == 1 && pool.getOpenCount() == 0);
    KJ_EXPECT(contains(e.getDescription(), "origin.test:8443") ||
        contains(e.getDescription(), proxyAddress->toString()), "names no address", e);
  }
  KJ_EXPECT(openFds() == fdsBefore, "a descriptor leaked", fdsBefore, openFds());
}

}  // namespace
}  // namespace sockfetch
