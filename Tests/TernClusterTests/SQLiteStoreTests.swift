import Foundation
import Testing
import TernCluster
import TernClusterStore

struct SQLiteStoreTests {
    @Test func recordsSurviveReopeningTheFile() throws {
        let path = NSTemporaryDirectory() + "tern-store-\(UUID().uuidString.prefix(8)).sqlite"
        defer { unlink(path) }
        var migration = MigrationRecord(vm: "v", source: "h1", destination: "h2", memoryMib: 64, operationId: "op", priority: -64,
                                        maxDowntimeMs: 300, createdAt: Date(timeIntervalSince1970: 1_700_000_000.5))
        migration.phase = .running
        migration.escalations = [.postcopy]
        migration.failures = ["first try"]
        do {
            let store = try SQLiteClusterStore(path: path)
            try store.save(HostRecord(name: "h1", address: "10.0.0.1:7400", draining: true))
            try store.save(HostRecord(name: "h2", address: "10.0.0.2:7400"))
            try store.save(migration)
            migration.attempt = 2
            try store.save(migration)
            try store.save(OperationRecord(id: "op", kind: .evacuate(host: "h1"), createdAt: Date(timeIntervalSince1970: 1_700_000_000)))
            try store.removeHost(named: "h2")
        }
        let reopened = try SQLiteClusterStore(path: path)
        #expect(try reopened.hosts() == [HostRecord(name: "h1", address: "10.0.0.1:7400", draining: true)])
        #expect(try reopened.migrations() == [migration], "the last save replaced the first")
        #expect(try reopened.operations().map(\.kind) == [.evacuate(host: "h1")])
    }

    @Test func aFileThatIsNotADatabaseIsRefusedWithItsPath() throws {
        let path = NSTemporaryDirectory() + "tern-store-\(UUID().uuidString.prefix(8)).sqlite"
        defer { unlink(path) }
        try Data(repeating: 0x41, count: 4096).write(to: URL(fileURLWithPath: path))
        #expect { try SQLiteClusterStore(path: path) } throws: { "\($0)".contains(path) }
    }
}
