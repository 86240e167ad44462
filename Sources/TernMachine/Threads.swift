import Foundation
import CKVM
import Glibc

/// Starts a named OS thread. vCPUs and blocking socket loops need real
/// threads, not tasks: they sit in ioctls and syscalls for long stretches.
@discardableResult
public func spawnThread(named name: String, _ body: @escaping @Sendable () -> Void) -> Thread {
    let thread = Thread(block: body)
    thread.name = name
    thread.stackSize = 1 << 20
    thread.start()
    return thread
}

/// Lowers the calling thread's scheduling priority (raises its nice value by
/// `steps`; no privilege needed). For bulk work that shares two cores with
/// latency-sensitive threads: post-copy's background push must not delay the
/// replies vCPUs wait on.
public func lowerCurrentThreadPriority(by steps: Int32) {
    let tid = id_t(ckvm_gettid())
    errno = 0
    let current = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid)
    guard errno == 0 else { return }
    _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid, current + steps)
}
