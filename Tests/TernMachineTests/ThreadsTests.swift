import Foundation
import Glibc
import Synchronization
import Testing
import TernKVM
import TernMachine

struct ThreadsTests {
    /// Post-copy's fault path asks for the real-time class; as root (CI) that must take effect.
    @Test(.enabled(if: geteuid() == 0, "needs root (CAP_SYS_NICE) to enter SCHED_FIFO"))
    func aLatencyCriticalThreadRunsInTheRealTimeClass() {
        let policy = Mutex<Int32?>(nil)
        let done = DispatchSemaphore(value: 0)
        spawnThread(named: "latency-critical") {
            let granted = makeCurrentThreadLatencyCritical()
            var current: Int32 = 0
            var parameters = sched_param()
            pthread_getschedparam(pthread_self(), &current, &parameters)
            policy.withLock { $0 = granted ? current : -1 }
            done.signal()
        }
        done.wait()
        #expect(policy.withLock { $0 } == SCHED_FIFO)
        var current: Int32 = 0
        var parameters = sched_param()
        pthread_getschedparam(pthread_self(), &current, &parameters)
        #expect(current == SCHED_OTHER, "only the thread that asked changes class")
    }
}
