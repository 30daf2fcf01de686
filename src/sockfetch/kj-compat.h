#pragma once
// Lets one source tree build against KJ 0.9.2 (Debian 12) and current KJ (capnproto "v2").
// On v2 everything here is a no-op or a one-line forwarder.

#include <kj/async-io.h>
#include <kj/common.h>
#include <kj/exception.h>

#ifdef KJ_IF_SOME
#define SOCKFETCH_KJ_HAS_NONE 1
#else
#define SOCKFETCH_KJ_HAS_NONE 0
// Same shape as v2's macro: `name` is a T& (0.9.2's KJ_IF_MAYBE yields a T*).
#define KJ_IF_SOME(name, exp) \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wdangling-else\"") \
  if (auto KJ_UNIQUE_NAME(_kjMaybe) = ::kj::_::readMaybe(exp)) \
    if (auto& name = *KJ_UNIQUE_NAME(_kjMaybe); false) {} else \
  _Pragma("GCC diagnostic pop")
#endif

namespace sockfetch {

#if SOCKFETCH_KJ_HAS_NONE
constexpr auto none = kj::none;
#else
constexpr decltype(nullptr) none = nullptr;
#endif
// Empty-Maybe literal: `return sockfetch::none;`, `maybe = sockfetch::none;`.

template <typename Stream = kj::AsyncOutputStream>
inline kj::Promise<void> writeAll(Stream& out, kj::ArrayPtr<const kj::byte> bytes) {
  // v2: write(ArrayPtr<const byte>); 0.9.2: write(const void*, size_t).
  if constexpr (requires { out.write(bytes); }) {
    return out.write(bytes);
  } else {
    return out.write(bytes.begin(), bytes.size());
  }
}

template <typename E = kj::Exception>
inline E cloneException(const E& e) {
  // v2 (2026-04+) deleted Exception's copy constructor in favour of clone().
  if constexpr (requires { e.clone(); }) {
    return e.clone();
  } else {
    return E(e);
  }
}

}  // namespace sockfetch
