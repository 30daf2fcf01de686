#pragma once
// A loopback HTTP/1.1 upstream for ConnectionPool's chaos test (pool-chaos-test.c++): every answer
// is chosen by a seed (answer normally with either framing, trickled or delayed, after 1xx, with
// `Connection: close`, with garbage or a second response behind it, before the request body; close
// without answering; reset before, inside or after the response; close an idle connection a moment
// later), and it records what a client must never make it see: pipelining, a request on a
// connection it poisoned, more connections open than allowed, a body other than the one sent.

#include <sockfetch/kj-compat.h>

#include <kj/async-io.h>
#include <kj/function.h>
#include <kj/map.h>
#include <kj/string.h>
#include <kj/vector.h>

namespace sockfetch {
namespace chaos {

uint64_t mix(uint64_t x);
// splitmix64's finalizer: a good 64-bit hash of a 64-bit value.

class Rng {
  // splitmix64: small, fast and, above all, the same sequence everywhere for a seed.
public:
  explicit Rng(uint64_t seed): state(seed) {}
  uint64_t next() {
    state += 0x9E3779B97F4A7C15ull;
    return mix(state);
  }
  unsigned below(unsigned n) { return n == 0 ? 0 : next() % n; }
  bool chance(unsigned percent) { return below(100) < percent; }
  size_t between(size_t lo, size_t hi) { return lo + next() % (hi - lo + 1); }

private:
  uint64_t state;
};

kj::String responseBodyFor(kj::StringPtr url);
// The only correct response body for `url`: the url itself (which holds a nonce), a newline and
// padding (`?pad=N` at the end of the url) that depends on the url, so that any misplaced byte
// shows.

kj::String requestBodyFor(kj::StringPtr url, size_t size);
// The request body the client sends for `url`, so the upstream can check what it got.

kj::String preview(kj::ArrayPtr<const char> bytes);
// The first bytes, printable, for messages.

void setNoDelay(kj::AsyncIoStream& stream);
// Trickled pieces and small request writes leave at once instead of waiting for an ACK.

enum class Fault {
  NONE,            // the answer is sent whole (it may still close the connection afterwards)
  CLOSE_SILENTLY,  // reads the request, closes without answering (the stale keep-alive race)
  RESET_BEFORE,    // reads the request, resets the connection (SO_LINGER 0)
  RESET_MID,       // sends part of the answer, then resets
  RESET_AFTER,     // sends the whole answer, then resets
};

enum class After {
  NOTHING,
  GARBAGE,          // bytes that are no HTTP at all
  SECOND_RESPONSE,  // a complete response nobody asked for
};

struct Behaviour {
  Fault fault = Fault::NONE;
  bool chunked = false;
  bool trailer = false;          // chunked only: a trailer field before the last CRLF
  unsigned interim = 0;          // 0: none, 1: 100 Continue, 2: 103 Early Hints (+ 100)
  bool connectionClose = false;  // `Connection: close`, then closes
  bool earlyAnswer = false;      // answers right after the head, reads the body afterwards
  bool trickle = false;          // in several writes, a little apart
  After after = After::NOTHING;  // in the same write as the end of the answer
  kj::Duration delay = 0 * kj::MILLISECONDS;        // before answering
  kj::Maybe<kj::Duration> idleClose;                // closes the idle connection this much later

  kj::String describe() const {
    static constexpr const char* FAULTS[] = {
        "answer", "close-silently", "reset-before", "reset-mid", "reset-after"};
    static constexpr const char* AFTERS[] = {"", " +garbage", " +second-response"};
    kj::String idle = kj::str("");
    KJ_IF_SOME(d, idleClose) {
      idle = kj::str(" idle-close@", d / kj::MILLISECONDS, "ms");
    }
    return kj::str(FAULTS[int(fault)], chunked ? " chunked" : " length",
        trailer ? " +trailer" : "", interim ? " +1xx" : "", connectionClose ? " conn-close" : "",
        earlyAnswer ? " early" : "", trickle ? " trickle" : "", AFTERS[int(after)],
        " delay=", delay / kj::MILLISECONDS, "ms", idle);
  }
};

struct Seen {
  // What the upstream did with the requests for one url (its attempts: a retry is a second one).
  unsigned attempts = 0;
  bool lastBenign = false;    // the last attempt's answer was meant to reach the client whole
  bool lastAnswered = false;  // ... and was written completely
  kj::String lastBehaviour;
};

class ChaosUpstream {
public:
  ChaosUpstream(kj::AsyncIoContext& io, uint64_t seed, unsigned maxConnections)
      : io(io), timer(io.provider->getTimer()), seed(seed), maxConnections(maxConnections),
        errorHandler(*this), tasks(errorHandler) {
    auto parsed = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope);
    listener = parsed->listen();
    tasks.add(acceptLoop());
  }

  kj::Own<kj::NetworkAddress> address() {
    return io.provider->getNetwork().parseAddress("127.0.0.1", listener->getPort())
        .wait(io.waitScope);
  }

  void closeAll();
  // Closes every connection that waits for its next request (all of them, at quiescence).

  bool calm = false;  // answer every request normally from now on
  kj::Maybe<Behaviour> forced;  // answer every request like this (for the upstream's self-test)
  kj::Maybe<kj::Function<kj::String(kj::StringPtr url)>> describeClient;
  // What the client is doing with the request for `url`, for messages.
  unsigned accepted = 0;
  unsigned maxOpen = 0;
  unsigned requests = 0;
  kj::Vector<kj::String> violations;
  kj::HashMap<kj::String, Seen> seen;

  unsigned openNow() const { return connections.size(); }

private:
  struct Connection;

  class ErrorHandler final: public kj::TaskSet::ErrorHandler {
  public:
    explicit ErrorHandler(ChaosUpstream& server): server(server) {}
    void taskFailed(kj::Exception&& exception) override {
      // The client going away mid-exchange (it cancelled, or the pool dropped the connection) is
      // normal here; anything else is a bug in this upstream.
      if (exception.getType() != kj::Exception::Type::DISCONNECTED) {
        server.violations.add(kj::str("the test upstream itself failed: ", exception));
      }
    }

  private:
    ChaosUpstream& server;
  };

  kj::AsyncIoContext& io;
  kj::Timer& timer;
  uint64_t seed;
  unsigned maxConnections;
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Vector<Connection*> connections;
  ErrorHandler errorHandler;
  kj::TaskSet tasks;

  kj::Promise<void> acceptLoop();
  kj::Promise<void> awaitHead(Connection& c);
  kj::Promise<void> handle(Connection& c, size_t headSize);
  kj::Promise<kj::String> readBody(Connection& c, kj::StringPtr head);
  kj::Promise<kj::String> readChunked(Connection& c, kj::String sofar);
  kj::Promise<bool> answer(Connection& c, const Behaviour& b, kj::StringPtr url, bool watch);
  kj::Promise<bool> fill(Connection& c);
  Behaviour choose(kj::StringPtr url, unsigned attempt, bool hasBody);
  void checkBody(kj::StringPtr url, kj::StringPtr head, kj::StringPtr body);
};

}  // namespace chaos
}  // namespace sockfetch
