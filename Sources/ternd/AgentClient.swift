import Foundation
import NIOCore
import NIOHTTP1
import TernAPI
import TernCluster
import TernClusterNet

/// The controller's side of the agents' API: each host's agent over mutual TLS, its
/// certificate checked against the host's name.
struct AgentClient: HostAgents {
    let tls: ClusterTLS

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    private func call(_ host: HostRecord, _ method: HTTPMethod, _ path: String, body: Data = Data(), timeout: Int64 = 15) throws -> APIClient.Response {
        guard let endpoint = host.endpoint else { throw Failure(description: "host \(host.name): address '\(host.address)' is not HOST:PORT") }
        return try tls.client(name: host.name, host: endpoint.host, port: endpoint.port).request(method, path, body: body, timeout: .seconds(timeout))
    }

    private func expect<T: Decodable>(_ type: T.Type, _ response: APIClient.Response, _ what: String) throws -> T {
        guard (200..<300).contains(response.status) else {
            throw Failure(description: "\(what): \(response.errorMessage ?? "the agent answered \(response.status)")")
        }
        return try APIJSON.decoder.decode(type, from: response.body)
    }

    private func expectSuccess(_ response: APIClient.Response, _ what: String) throws {
        guard (200..<300).contains(response.status) else {
            throw Failure(description: "\(what): \(response.errorMessage ?? "the agent answered \(response.status)")")
        }
    }

    private static func path(_ name: String) -> String { name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? name }

    func status(of host: HostRecord) throws -> HostStatus {
        try expect(HostStatus.self, try call(host, .GET, "/v1/host", timeout: 5), "host \(host.name)")
    }

    func createVM(_ spec: VMSpec, on host: HostRecord) throws -> VMStatus {
        try expect(VMStatus.self, try call(host, .POST, "/v1/vms", body: try APIJSON.encoder.encode(spec)), "starting \(spec.name) on \(host.name)")
    }

    func prepareIncoming(_ spec: VMSpec, migrationId: String, on host: HostRecord) throws -> String {
        let body = try APIJSON.encoder.encode(AgentRoutes.IncomingRequest(spec: spec, migrationId: migrationId))
        return try expect(AgentRoutes.IncomingAnswer.self, try call(host, .POST, "/v1/vms/\(Self.path(spec.name))/incoming", body: body),
                          "readying \(host.name) for \(spec.name)").address
    }

    func startMigration(_ request: AgentMigrateRequest, vm: String, on host: HostRecord) throws {
        try expectSuccess(try call(host, .POST, "/v1/vms/\(Self.path(vm))/migrate", body: try APIJSON.encoder.encode(request)),
                          "starting the migration of \(vm) on \(host.name)")
    }

    func migration(of vm: String, on host: HostRecord) throws -> MigrationProgress? {
        let response = try call(host, .GET, "/v1/vms/\(Self.path(vm))/migration", timeout: 5)
        if response.status == 404 { return nil }
        return try expect(MigrationProgress.self, response, "the migration of \(vm) on \(host.name)")
    }

    func act(_ action: MigrationAction, vm: String, on host: HostRecord) throws {
        try expectSuccess(try call(host, .POST, "/v1/vms/\(Self.path(vm))/migration/action", body: try APIJSON.encoder.encode(action)),
                          "\(action) for \(vm) on \(host.name)")
    }

    func discardIncoming(_ vm: String, migrationId: String, on host: HostRecord) throws {
        try expectSuccess(try call(host, .DELETE, "/v1/vms/\(Self.path(vm))/incoming/\(Self.path(migrationId))"),
                          "stopping the waiting \(vm) on \(host.name)")
    }
}
