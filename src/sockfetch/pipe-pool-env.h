#pragma once
// Test helpers: a ConnectionPool over in-process pipes, on a timer the test advances by hand, so
// that the order of events is deterministic and nothing depends on wall time. Pipes need no file
// descriptors: thousands of connections fit in one test.

#include <sockfetch/connector.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/pool.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/timer.h>
#include <kj/vector.h>
#include <stdlib.h>
#include <string.h>

namespace sockfetch {
namespace test {

// =================================================================================================
// PipeUpstream: connections over in-process pipes, numbered from 0 as they are opened. Each
// answers a request with its own number and the request's path ("7 /x"); a path starting with
// "/close" gets `Connection: close` and the connection is then closed. end(n) ends connection n
// from the server's side (a server closing an idle connection).

class PipeUpstream {
public:
  PipeUpstream(): tasks(errors) {}

  Connector connector() {
    return [this]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      ++connects;
      auto pipe = kj::newTwoWayPipe();
      auto conn = kj::heap<Conn>(*this, conns.size(), kj::mv(pipe.ends[1]));
      conns.add(conn.get());
      tasks.add(serve(*conn).attach(kj::mv(conn)));
      kj::Promise<kj::Own<kj::AsyncIoStream>> result = kj::mv(pipe.ends[0]);
      KJ_IF_SOME(hook, inConnector) {
        hook();  // synchronously, from within the pool
      }
      KJ_IF_SOME(delay, delayConnect) {
        result = delay(kj::mv(result));
      }
      return result;
    };
  }

  void end(unsigned n) {
    KJ_IF_SOME(conn, conns[n]) {
      conn.stream->shutdownWrite();
    }
  }

  void poke(unsigned n, kj::StringPtr bytes) {
    // The server sends bytes nobody asked for on connection n.
    KJ_IF_SOME(conn, conns[n]) {
      tasks.add(writeAll(*conn.stream, bytes.asBytes()));
    }
  }

  unsigned open = 0;      // server ends alive (the client end closes: the server end goes)
  unsigned connects = 0;  // connector() calls
  kj::Vector<kj::String> seen;  // "N /path", in the order requests arrived
  kj::Maybe<kj::Function<void()>> inConnector;
  kj::Maybe<kj::Function<kj::Promise<kj::Own<kj::AsyncIoStream>>(
      kj::Promise<kj::Own<kj::AsyncIoStream>>)>> delayConnect;

private:
  struct Conn {
    Conn(PipeUpstream& up, unsigned id, kj::Own<kj::AsyncIoStream> stream)
        : up(up), id(id), stream(kj::mv(stream)) {
      ++up.open;
    }
    ~Conn() noexcept(false) {
      --up.open;
      up.conns[id] = nullptr;
    }
    PipeUpstream& up;
    unsigned id;
    kj::Own<kj::AsyncIoStream> stream;
    kj::Vector<char> head;
    char buffer[256];
  };
  struct Errors final: public kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&& e) override {
      // A client end dropped while the server writes: not the test's concern.
      if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
      KJ_FAIL_EXPECT("the test's upstream failed", e);
    }
  };

  kj::Vector<kj::Maybe<Conn&>> conns;
  Errors errors;
  kj::TaskSet tasks;

  kj::Promise<void> serve(Conn& c) {
    return c.stream->tryRead(c.buffer, 1, sizeof(c.buffer)).then([this, &c](size_t n)
        -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;  // the client closed
      c.head.addAll(c.buffer, c.buffer + n);
      auto text = c.head.asPtr();
      if (text.size() < 4 || memcmp(text.end() - 4, "\r\n\r\n", 4) != 0) return serve(c);
      size_t pathStart = 0;
      while (text[pathStart] != ' ') pathStart++;
      size_t pathEnd = ++pathStart;
      while (text[pathEnd] != ' ') pathEnd++;
      auto path = kj::heapString(text.slice(pathStart, pathEnd));
      auto body = kj::str(c.id, " ", path);
      seen.add(kj::heapString(body));
      bool close = path.startsWith("/close");
      auto reply = kj::str("HTTP/1.1 200 OK\r\n", close ? "Connection: close\r\n" : "",
          "Content-Length: ", body.size(), "\r\n\r\n", body);
      c.head.clear();
      auto& r = reply;
      return writeAll(*c.stream, r.asBytes()).attach(kj::mv(reply))
          .then([this, &c, close]() -> kj::Promise<void> {
        if (close) return kj::READY_NOW;  // Conn (and the server end) goes
        return serve(c);
      });
    });
  }
};

struct PipePoolEnv {
  kj::EventLoop loop;
  kj::WaitScope ws{loop};
  kj::TimerImpl timer{kj::origin<kj::TimePoint>()};
  kj::HttpHeaderTable table;
  PipeUpstream upstream;
  ConnectionPool::Settings settings;
  kj::Own<ConnectionPool> pool;

  explicit PipePoolEnv(ConnectionPool::Settings s): settings(s) {
    pool = kj::heap<ConnectionPool>(timer, table, upstream.connector(), kj::mv(s));
  }

  kj::Promise<kj::HttpClient::Response> start(kj::StringPtr path) {
    // A GET whose response is pursued at once.
    kj::HttpHeaders headers(table);
    auto request = pool->request(kj::HttpMethod::GET, path, headers);
    request.body = nullptr;
    return request.response.eagerlyEvaluate(nullptr);
  }

  kj::Promise<kj::HttpClient::WebSocketResponse> takeIdle() {
    // A WebSocket handshake, which takes the newest idle connection at once; its chain runs only
    // in a later turn, so dropped before the event loop runs, it has sent nothing and the
    // connection is given back unused.
    kj::HttpHeaders headers(table);
    return pool->openWebSocket("/ws", headers);
  }

  void turns(unsigned n = 30) {
    for (unsigned i = 0; i < n; i++) kj::evalLater([]() {}).wait(ws);
  }

  template <typename T>
  T bounded(kj::Promise<T>&& promise) {
    // Everything is in-process: a promise that the event loop cannot complete is a hang.
    KJ_ASSERT(promise.poll(ws), "hung: the event loop ran dry with this promise pending");
    return promise.wait(ws);
  }

  kj::String read(kj::HttpClient::Response&& response) {
    KJ_ASSERT(response.statusCode == 200);
    return bounded(response.body->readAllText().attach(kj::mv(response.body)));
  }

  kj::String get(kj::StringPtr path) {
    return read(bounded(start(path)));
  }

  void advance(kj::Duration d) {
    timer.advanceTo(timer.now() + d);
    turns();
  }

  void checkCounted(kj::StringPtr where) {
    // Nothing in flight: every connection opened is open (and idle) or counted once as dropped,
    // and the pool's counts agree with the upstream's.
    KJ_CONTEXT(where);
    turns();
    auto& s = pool->getStats();
    KJ_EXPECT(pool->getWaitingCount() == 0, pool->getWaitingCount());
    KJ_EXPECT(pool->getIdleCount() == pool->getOpenCount(), pool->getIdleCount(),
        pool->getOpenCount());
    KJ_EXPECT(pool->getOpenCount() == upstream.open, pool->getOpenCount(), upstream.open);
    KJ_EXPECT(s.connectionsOpened == pool->getOpenCount() + s.dropped(),
        "a connection was dropped uncounted, or counted twice", s.connectionsOpened,
        pool->getOpenCount(), s.dropped());
  }
};

inline ConnectionPool::Settings limits(unsigned maxConnections) {
  // Limits of maxConnections connections, all idle if need be, and timeouts that never fall due
  // unless a test moves the timer that far.
  ConnectionPool::Settings settings;
  settings.maxConnections = maxConnections;
  settings.maxIdleConnections = maxConnections;
  settings.idleTimeout = 1000 * kj::SECONDS;
  settings.waitTimeout = 1000 * kj::SECONDS;
  settings.connectTimeout = 1000 * kj::SECONDS;
  return settings;
}

inline kj::String outcomeOf(PipePoolEnv& env,
    kj::Promise<kj::HttpClient::Response>&& promise) {
  // The body of the response, or "failed: " and why.
  return env.bounded(promise.then([](kj::HttpClient::Response&& r) {
    return r.body->readAllText().attach(kj::mv(r.body));
  }, [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
}

inline unsigned connectionOf(kj::StringPtr body) {
  // The upstream's connection number, from a body "N /path".
  return strtoul(body.cStr(), nullptr, 10);
}

}  // namespace test
}  // namespace sockfetch
