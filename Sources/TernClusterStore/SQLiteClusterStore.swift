import Foundation
import GRDB
import TernCluster

/// The controller's store in one SQLite file (through GRDB), for a cluster with one
/// controller: a controller restarted on the same file resumes where it stopped. Each
/// record is one row holding its JSON, keyed as the records are; the schema is versioned
/// by GRDB's migrator.
public final class SQLiteClusterStore: ClusterStore {
    public let path: String
    private let database: DatabaseQueue

    public init(path: String) throws {
        self.path = path
        var configuration = Configuration()
        // A second controller on the same file waits its turn instead of failing at once.
        configuration.busyMode = .timeout(5)
        do {
            database = try DatabaseQueue(path: path, configuration: configuration)
        } catch {
            throw ClusterStoreError.unavailable("cannot open \(path): \(error)")
        }
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.create(table: "host") { table in
                table.primaryKey("name", .text)
                table.column("record", .blob).notNull()
            }
            try db.create(table: "migration") { table in
                table.primaryKey("id", .text)
                table.column("vm", .text).notNull().indexed()
                table.column("phase", .text).notNull().indexed()
                table.column("created_at", .double).notNull()
                table.column("record", .blob).notNull()
            }
            try db.create(table: "operation") { table in
                table.primaryKey("id", .text)
                table.column("created_at", .double).notNull()
                table.column("record", .blob).notNull()
            }
        }
        do { try migrator.migrate(database) } catch {
            throw ClusterStoreError.unavailable("cannot prepare \(path): \(error)")
        }
    }

    private static var encoder: JSONEncoder { ClusterRecordCoding.encoder }
    private static var decoder: JSONDecoder { ClusterRecordCoding.decoder }

    private func rows<T: Decodable>(_ sql: String) throws -> [T] {
        try database.read { db in
            try Data.fetchAll(db, sql: sql).map { try Self.decoder.decode(T.self, from: $0) }
        }
    }

    public func hosts() throws -> [HostRecord] { try rows("SELECT record FROM host ORDER BY name") }

    public func save(_ host: HostRecord) throws {
        let record = try Self.encoder.encode(host)
        try database.write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO host (name, record) VALUES (?, ?)", arguments: [host.name, record])
        }
    }

    public func removeHost(named name: String) throws {
        try database.write { db in try db.execute(sql: "DELETE FROM host WHERE name = ?", arguments: [name]) }
    }

    public func migrations() throws -> [MigrationRecord] { try rows("SELECT record FROM migration ORDER BY created_at, id") }

    public func save(_ migration: MigrationRecord) throws {
        let record = try Self.encoder.encode(migration)
        try database.write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO migration (id, vm, phase, created_at, record) VALUES (?, ?, ?, ?, ?)",
                           arguments: [migration.id, migration.vm, migration.phase.rawValue, migration.createdAt.timeIntervalSince1970, record])
        }
    }

    public func operations() throws -> [OperationRecord] { try rows("SELECT record FROM operation ORDER BY created_at, id") }

    public func save(_ operation: OperationRecord) throws {
        let record = try Self.encoder.encode(operation)
        try database.write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO operation (id, created_at, record) VALUES (?, ?, ?)",
                           arguments: [operation.id, operation.createdAt.timeIntervalSince1970, record])
        }
    }
}
