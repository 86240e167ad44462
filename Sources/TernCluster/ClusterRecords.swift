import Foundation

/// A host the controller manages: its agent's address and whether it is being emptied.
public struct HostRecord: Codable, Sendable, Equatable {
    public var name: String
    /// The agent's HTTPS address, host:port.
    public var address: String
    /// Being evacuated: no VM is placed here, and those here are moved away.
    public var draining: Bool

    public init(name: String, address: String, draining: Bool = false) {
        self.name = name
        self.address = address
        self.draining = draining
    }

    /// The address split for a TCP connection, or nil when it is not host:port.
    public var endpoint: (host: String, port: Int)? {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]),
              (1...65535).contains(port), colon > address.startIndex else { return nil }
        return (String(address[..<colon]), port)
    }
}

/// Where a migration the controller runs stands. Each step is written down before it is
/// taken, and each step the agents take is keyed by the migration's id, so a controller
/// that restarts (or takes over) repeats a step rather than the migration.
public enum MigrationPhase: String, Codable, Sendable, CaseIterable {
    /// Waiting for a slot under the limits.
    case pending
    /// The destination is being readied and the source told to send.
    case starting
    /// The source is sending.
    case running
    case completed
    /// Given up on after its attempts (`reason` says why); the VM stayed on its source.
    case failed
    case cancelled

    public var isActive: Bool { self == .starting || self == .running }
    public var isFinished: Bool { self == .completed || self == .failed || self == .cancelled }
}

/// What a progress timeout does to a migration that stopped gaining on its guest.
public enum Escalation: String, Codable, Sendable, CaseIterable {
    /// Double the downtime target (up to the policy's ceiling), then cancel.
    case raiseDowntime = "raise-downtime"
    /// Switch to post-copy: the VM moves at once and its pages follow.
    case postcopy
    case cancel
}

/// One migration the controller runs (and its retries).
public struct MigrationRecord: Codable, Sendable, Equatable, Identifiable {
    public var id: String
    public var vm: String
    public var source: String
    public var destination: String
    public var memoryMib: UInt64
    public var phase: MigrationPhase
    /// 1 for the first try; a failed try that may be retried goes back to pending with one more.
    public var attempt: Int
    /// The operation (evacuation, migrate request) it belongs to.
    public var operationId: String?
    /// Lower runs first among pending migrations.
    public var priority: Double
    public var createdAt: Date
    public var startedAt: Date?
    public var finishedAt: Date?
    /// Not retried before this.
    public var notBefore: Date?
    /// Where the destination waits (tcp:IP:PORT), once it does.
    public var destinationAddress: String?
    public var reason: String?
    /// Why each earlier attempt failed.
    public var failures: [String]
    /// Escalations taken, in order.
    public var escalations: [Escalation]
    public var maxDowntimeMs: Double
    public var transferredBytes: UInt64
    public var remainingBytes: UInt64?
    /// The fewest bytes left this attempt has reached.
    public var lowestRemainingBytes: UInt64?
    /// When `lowestRemainingBytes` was last lowered (the progress timeout counts from there).
    public var lastProgressAt: Date?
    public var downtimeMs: Double?
    public var totalMs: Double?
    public var verified: Bool?

    public init(id: String = UUID().uuidString.lowercased(), vm: String, source: String, destination: String, memoryMib: UInt64,
                operationId: String?, priority: Double = 0, maxDowntimeMs: Double, createdAt: Date) {
        self.id = id
        self.vm = vm
        self.source = source
        self.destination = destination
        self.memoryMib = memoryMib
        self.phase = .pending
        self.attempt = 1
        self.operationId = operationId
        self.priority = priority
        self.createdAt = createdAt
        self.failures = []
        self.escalations = []
        self.maxDowntimeMs = maxDowntimeMs
        self.transferredBytes = 0
    }

    /// The id the agents see for this attempt: a retry is a new migration to them.
    public var attemptID: String { attempt == 1 ? id : "\(id).\(attempt)" }
}

/// What an operator asked the controller for.
public enum OperationKind: Codable, Sendable, Equatable {
    case evacuate(host: String)
    case migrate(vm: String, to: String)
    case balance
}

public enum OperationPhase: String, Codable, Sendable {
    case active, completed, failed
}

public struct OperationRecord: Codable, Sendable, Equatable, Identifiable {
    public var id: String
    public var kind: OperationKind
    public var phase: OperationPhase
    public var reason: String?
    public var createdAt: Date
    public var finishedAt: Date?

    public init(id: String = UUID().uuidString.lowercased(), kind: OperationKind, createdAt: Date) {
        self.id = id
        self.kind = kind
        self.phase = .active
        self.createdAt = createdAt
    }
}

/// JSON of the controller's API: snake_case keys and ISO 8601 times.
public enum ClusterJSON {
    public static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        return encoder
    }()

    public static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }()
}

/// How stores keep records: JSON with sorted keys and times in milliseconds since 1970.
public enum ClusterRecordCoding {
    public static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .millisecondsSince1970
        encoder.outputFormatting = .sortedKeys
        return encoder
    }()

    public static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .millisecondsSince1970
        return decoder
    }()
}
