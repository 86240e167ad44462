import Dispatch
import Testing
import TernKVM
import TernMachine

/// Quits `machine` and expects it to end within seconds: a vCPU that never leaves
/// KVM_RUN (e.g. left waiting for a page) must fail the test, not hang the suite.
func expectEnds(_ machine: Machine?, sourceLocation: SourceLocation = #_sourceLocation) {
    guard let machine else { return }
    machine.requestExit(MachineExit(kind: .quit, message: "test over"))
    let ended = DispatchSemaphore(value: 0)
    spawnThread(named: "wait-for-exit") {
        _ = machine.waitForExit()
        ended.signal()
    }
    #expect(ended.wait(timeout: .now() + 10) == .success, "the VM ends", sourceLocation: sourceLocation)
}
