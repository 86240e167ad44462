import Foundation
import Synchronization

/// Where the controller keeps what it decided: hosts, operations and migrations. Every
/// write is whole (a record replaces the one with its key), so a controller that stops
/// between two writes leaves records that each still make sense.
public protocol ClusterStore: Sendable {
    func hosts() throws -> [HostRecord]
    func save(_ host: HostRecord) throws
    func removeHost(named name: String) throws
    func migrations() throws -> [MigrationRecord]
    func save(_ migration: MigrationRecord) throws
    func operations() throws -> [OperationRecord]
    func save(_ operation: OperationRecord) throws
}

/// A store in memory, for unit tests of the controller's decisions.
public final class MemoryClusterStore: ClusterStore {
    private struct Contents {
        var hosts: [String: HostRecord] = [:]
        var migrations: [String: MigrationRecord] = [:]
        var operations: [String: OperationRecord] = [:]
    }
    private let contents = Mutex(Contents())
    /// Set to make every call fail (a store that became unreachable).
    public let failing = Atomic<Bool>(false)

    public init() {}

    private func check() throws {
        if failing.load(ordering: .relaxed) { throw ClusterStoreError.unavailable("the in-memory store is set to fail") }
    }

    public func hosts() throws -> [HostRecord] { try check(); return contents.withLock { $0.hosts.values.sorted { $0.name < $1.name } } }
    public func save(_ host: HostRecord) throws { try check(); contents.withLock { $0.hosts[host.name] = host } }
    public func removeHost(named name: String) throws { try check(); _ = contents.withLock { $0.hosts.removeValue(forKey: name) } }
    public func migrations() throws -> [MigrationRecord] {
        try check(); return contents.withLock { $0.migrations.values.sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) } }
    }
    public func save(_ migration: MigrationRecord) throws { try check(); contents.withLock { $0.migrations[migration.id] = migration } }
    public func operations() throws -> [OperationRecord] {
        try check(); return contents.withLock { $0.operations.values.sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) } }
    }
    public func save(_ operation: OperationRecord) throws { try check(); contents.withLock { $0.operations[operation.id] = operation } }
}

public enum ClusterStoreError: Error, CustomStringConvertible {
    case unavailable(String)

    public var description: String {
        switch self {
        case .unavailable(let why): "the cluster store is unavailable: \(why)"
        }
    }
}
