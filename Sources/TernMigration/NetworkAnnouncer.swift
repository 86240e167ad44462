import Foundation
import Logging
import TernDevices
import TernKVM
import TernMachine
import TernWire

/// When a destination announces a migrated VM's new place on its NICs' TAPs (`tern migrate
/// --announce-*`), with QEMU's announce-self parameters and defaults: 5 rounds, the first at once,
/// the next after 50 ms, each gap 100 ms longer than the last, at most 550 ms. No rounds: no
/// announcement at all, neither the host's RARPs nor the guest's own.
public struct AnnounceSchedule: Equatable, Sendable {
    public var rounds: Int = 5
    public var initialMs: Int = 50
    public var maxMs: Int = 550
    public var stepMs: Int = 100
    public static let maximumRounds = 100
    public static let maximumMs = 60_000

    public init(rounds: Int = 5, initialMs: Int = 50, maxMs: Int = 550, stepMs: Int = 100) {
        self.rounds = rounds
        self.initialMs = initialMs
        self.maxMs = maxMs
        self.stepMs = stepMs
    }

    /// Why these values cannot be used, or nil.
    public var problem: String? {
        guard (0...Self.maximumRounds).contains(rounds) else { return "announce rounds must be between 0 and \(Self.maximumRounds)" }
        for (name, value) in [("initial", initialMs), ("max", maxMs), ("step", stepMs)] where !(0...Self.maximumMs).contains(value) {
            return "announce \(name) must be between 0 and \(Self.maximumMs) ms"
        }
        return nil
    }

    /// The waits between rounds, in milliseconds.
    public var gapsMs: [Int] { (0..<max(rounds - 1, 0)).map { min(initialMs + $0 * stepMs, maxMs) } }

    func encode(into writer: inout WireWriter) {
        for value in [rounds, initialMs, maxMs, stepMs] { writer.write(UInt32(value)) }
    }

    init(reading reader: inout WireReader) throws(WireError) {
        rounds = Int(try reader.read(UInt32.self))
        initialMs = Int(try reader.read(UInt32.self))
        maxMs = Int(try reader.read(UInt32.self))
        stepMs = Int(try reader.read(UInt32.self))
        if let problem { throw .malformed("hello: \(problem)") }
    }
}

/// A destination's announcement of the VM it now runs: in the first round it asks every guest driver
/// that negotiated VIRTIO_NET_F_GUEST_ANNOUNCE to send its own gratuitous ARP, and in every round it
/// sends a RARP from each NIC's MAC on its TAP. A failed send is logged and counted in the NIC's
/// counters (`tern info`); it does not undo a migration that completed.
enum NetworkAnnouncer {
    /// Sends the first round at once, on the caller's thread, and the later ones from a thread of their own.
    /// Called before the VM's vCPUs start: frames the switch then sends here wait in the TAP's queue for the
    /// guest instead of going to the old host, so the outage ends with the downtime rather than after it.
    static func start(for machine: Machine, schedule: AnnounceSchedule, logger: Logger) {
        let networks = machine.devices.networks
        guard schedule.rounds > 0, !networks.isEmpty else { return }
        let asked = machine.devices.requestGuestAnnouncements()
        let round: @Sendable (Int) -> Void = { number in
            for network in networks where !network.sendRARP() {
                logger.warning("announcement round \(number): the RARP on TAP '\(network.tap.name)' could not be sent")
            }
        }
        round(1)
        spawnThread(named: "tern-announce") {
            for (number, gap) in zip(2...max(2, schedule.rounds), schedule.gapsMs) {
                Thread.sleep(forTimeInterval: Double(gap) / 1000)
                round(number)
            }
            let failed = networks.reduce(0) { $0 + $1.announcementsFailed.load(ordering: .relaxed) }
            logger.info("announced the VM on \(networks.map(\.tap.name).joined(separator: ", ")): \(schedule.rounds) RARP rounds\(failed > 0 ? ", \(failed) failed" : ""); \(asked) guest driver\(asked == 1 ? "" : "s") asked to announce")
        }
    }
}
