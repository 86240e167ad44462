import Foundation
import TernCluster

/// The controller's store on etcd, for several controllers: each record is the JSON
/// value of one key (PREFIX/hosts/NAME, PREFIX/migrations/ID, PREFIX/operations/ID),
/// and every write is fenced on the leadership, so that only the leader writes.
public final class EtcdClusterStore: ClusterStore {
    public let client: EtcdClient
    public let prefix: String
    public let leadership: EtcdLeadership

    public init(client: EtcdClient, prefix: String = "/tern/", leadership: EtcdLeadership) {
        self.client = client
        self.prefix = prefix.hasSuffix("/") ? prefix : prefix + "/"
        self.leadership = leadership
    }

    private static var encoder: JSONEncoder { ClusterRecordCoding.encoder }
    private static var decoder: JSONDecoder { ClusterRecordCoding.decoder }

    private func records<T: Decodable>(_ kind: String) throws -> [T] {
        try client.range(prefix: prefix + kind + "/").map { try Self.decoder.decode(T.self, from: $0.value) }
    }

    private func write(_ kind: String, _ id: String, _ value: some Encodable) throws {
        let data = try Self.encoder.encode(value)
        guard try client.put(prefix + kind + "/" + id, data, onlyIf: leadership.key, holds: Data(leadership.name.utf8)) else {
            throw EtcdError.notLeader(leadership.leader)
        }
    }

    public func hosts() throws -> [HostRecord] { try records("hosts") }
    public func save(_ host: HostRecord) throws { try write("hosts", host.name, host) }
    public func removeHost(named name: String) throws {
        guard try client.delete(prefix + "hosts/" + name, onlyIf: leadership.key, holds: Data(leadership.name.utf8)) else {
            throw EtcdError.notLeader(leadership.leader)
        }
    }
    public func migrations() throws -> [MigrationRecord] {
        (try records("migrations") as [MigrationRecord]).sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
    }
    public func save(_ migration: MigrationRecord) throws { try write("migrations", migration.id, migration) }
    public func operations() throws -> [OperationRecord] {
        (try records("operations") as [OperationRecord]).sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
    }
    public func save(_ operation: OperationRecord) throws { try write("operations", operation.id, operation) }
}
