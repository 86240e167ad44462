import Foundation
import Synchronization
import TernAPI
import TernCluster
import TernMachine

/// Samples each running VM's activity every `interval` seconds, on a thread of its own:
/// its dirty rate (the VM's GET /v1/vm/dirty-rate over `windowMs`), its CPU time per
/// second, and its devices' counters. A VM that migrates is left alone: its migration
/// owns the dirty log, and its report has the rate.
final class ActivitySampler: Sendable {
    struct Target: Sendable {
        var name: String
        var apiSocket: String
        var cpuSeconds: Double
    }

    let interval: Double
    let windowMs: Int
    private let samples = Mutex<[String: (activity: VMActivity, cpuSeconds: Double)]>([:])

    init(interval: Double, windowMs: Int = 200) {
        self.interval = interval
        self.windowMs = windowMs
    }

    func activity(of name: String) -> VMActivity? { samples.withLock { $0[name]?.activity } }

    /// Starts the thread; `targets` lists the VMs to sample now.
    func start(targets: @escaping @Sendable () -> [Target]) {
        let thread = Thread { [self] in
            while true {
                let current = targets()
                samples.withLock { stored in stored = stored.filter { entry in current.contains { $0.name == entry.key } } }
                for target in current { sample(target) }
                usleep(useconds_t(interval * 1_000_000))
            }
        }
        thread.start()
    }

    private func sample(_ target: Target) {
        let client = APIClient(socketPath: target.apiSocket)
        guard let rate = try? client.request(.GET, "/v1/vm/dirty-rate?ms=\(windowMs)", timeout: .seconds(10)), rate.status == 200,
              let dirty = try? APIJSON.decoder.decode(DirtyRateSample.self, from: rate.body) else { return }
        var disk = 0, network = 0
        if let info = try? client.request(.GET, "/v1/vm", timeout: .seconds(3)), info.status == 200,
           let machine = try? APIJSON.decoder.decode(MachineInfo.self, from: info.body) {
            for device in machine.devices ?? [] {
                if device.counters["bytes_read"] != nil {
                    disk += device.counters.filter { !$0.key.hasPrefix("bytes") }.values.reduce(0, +)
                } else {
                    network += device.counters.filter { $0.key.hasPrefix("frames_") }.values.reduce(0, +)
                }
            }
        }
        let now = Date().timeIntervalSince1970 * 1000
        samples.withLock { stored in
            let previous = stored[target.name]
            let cpu = previous.map { earlier in
                (target.cpuSeconds - earlier.cpuSeconds) / max(0.001, (now - earlier.activity.sampledAtUnixMs) / 1000)
            }
            stored[target.name] = (VMActivity(dirtyBytesPerSecond: dirty.bytesPerSecond, cpuFraction: cpu, diskOperations: disk,
                                              networkFrames: network, sampledAtUnixMs: now), target.cpuSeconds)
        }
    }
}
