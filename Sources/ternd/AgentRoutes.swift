import Foundation
import TernAPI
import TernCluster

/// The agent's HTTP API (docs/cluster-api.yaml), served over mutual TLS:
///   GET    /v1/host                          -> HostStatus
///   GET    /v1/vms                           -> [VMStatus]
///   POST   /v1/vms {VMSpec}                  -> 201 VMStatus (a tern process started)
///   GET    /v1/vms/NAME                      -> VMStatus
///   DELETE /v1/vms/NAME                      -> 204 (the VM quits)
///   POST   /v1/vms/NAME/incoming {spec, migration_id} -> {"address": "tcp:IP:PORT"}
///   DELETE /v1/vms/NAME/incoming/ID          -> 204 (the empty VM waiting for ID stops)
///   POST   /v1/vms/NAME/migrate {AgentMigrateRequest} -> 202
///   GET    /v1/vms/NAME/migration            -> MigrationProgress
///   POST   /v1/vms/NAME/migration/action {MigrationAction} -> 202
struct AgentRoutes: Sendable {
    let agent: HostAgent
    let metrics: MetricsEndpoint

    struct IncomingRequest: Codable {
        var spec: VMSpec
        var migrationId: String
    }

    struct IncomingAnswer: Codable {
        var address: String
    }

    func handle(method: String, uri: String, body: Data) -> APIResponse {
        let path = RoutePath(uri)
        do {
            if method == "GET", path.match("metrics") != nil {
                let status = agent.status()
                return metrics.response { now in
                    MetricsEndpoint.gauge(now, "tern_agent_memory_capacity_bytes", "Memory this host's VMs may use.", [("host", status.name)])
                        .set(to: Double(status.memoryCapacityMib) * 1_048_576)
                    MetricsEndpoint.gauge(now, "tern_agent_memory_committed_bytes", "Memory of the VMs here or on their way here.", [("host", status.name)])
                        .set(to: Double(status.committedMib) * 1_048_576)
                    for state in [VMRunState.starting, .running, .paused, .incoming, .lost, .departed] {
                        MetricsEndpoint.gauge(now, "tern_agent_vms", "VMs on this host by state.", [("host", status.name), ("state", state.rawValue)])
                            .set(to: Double(status.vms.filter { $0.state == state }.count))
                    }
                    for vm in status.vms where vm.pid != nil {
                        MetricsEndpoint.counter(now, "tern_agent_vm_cpu_seconds_total", "CPU time of the VM's tern process.", [("host", status.name), ("vm", vm.name)])
                            .increment(by: vm.cpuSeconds)
                    }
                }
            } else if method == "GET", path.match("v1", "host") != nil {
                return .json(agent.status())
            } else if method == "GET", path.match("v1", "vms") != nil {
                return .json(agent.status().vms)
            } else if method == "POST", path.match("v1", "vms") != nil {
                return .json(try agent.create(try RoutePath.decode(VMSpec.self, body)), status: 201)
            } else if method == "GET", let captured = path.match("v1", "vms", "*") {
                let name = captured[0]
                guard let status = agent.vmStatus(name) else { return .error(404, "not_found", "no VM named '\(name)' here") }
                return .json(status)
            } else if method == "DELETE", let captured = path.match("v1", "vms", "*") {
                let name = captured[0]
                try agent.stop(name)
                return .noContent()
            } else if method == "POST", let captured = path.match("v1", "vms", "*", "incoming") {
                let name = captured[0]
                let request = try RoutePath.decode(IncomingRequest.self, body)
                guard request.spec.name == name else { return .error(400, "bad_request", "the spec names '\(request.spec.name)', the path '\(name)'") }
                return .json(IncomingAnswer(address: try agent.prepareIncoming(request.spec, migrationId: request.migrationId)))
            } else if method == "DELETE", let captured = path.match("v1", "vms", "*", "incoming", "*") {
                let name = captured[0]; let id = captured[1]
                agent.discardIncoming(name, migrationId: id)
                return .noContent()
            } else if method == "POST", let captured = path.match("v1", "vms", "*", "migrate") {
                let name = captured[0]
                try agent.startMigration(name, try RoutePath.decode(AgentMigrateRequest.self, body))
                return .accepted
            } else if method == "GET", let captured = path.match("v1", "vms", "*", "migration") {
                let name = captured[0]
                guard let progress = agent.migration(name) else { return .error(404, "not_found", "VM '\(name)' has no migration here") }
                return .json(progress)
            } else if method == "POST", let captured = path.match("v1", "vms", "*", "migration", "action") {
                let name = captured[0]
                try agent.act(name, try RoutePath.decode(MigrationAction.self, body))
                return .accepted
            } else {
                return RoutePath.unknown(method, path, known: Self.routes)
            }
        } catch let refusal as AgentRefusal {
            return .error(refusal.status, refusal.code, refusal.description)
        } catch let refusal as RoutePath.BadBody {
            return .error(400, "bad_request", refusal.description)
        } catch {
            return .error(500, "failed", "\(error)")
        }
    }

    static let routes: [(methods: [String], pattern: [String])] = [
        (["GET"], ["metrics"]), (["GET"], ["v1", "host"]), (["GET", "POST"], ["v1", "vms"]), (["GET", "DELETE"], ["v1", "vms", "*"]),
        (["POST"], ["v1", "vms", "*", "incoming"]), (["DELETE"], ["v1", "vms", "*", "incoming", "*"]),
        (["POST"], ["v1", "vms", "*", "migrate"]), (["GET"], ["v1", "vms", "*", "migration"]),
        (["POST"], ["v1", "vms", "*", "migration", "action"]),
    ]
}

/// A request's path split into its parts, and the answers every route table shares.
struct RoutePath {
    let parts: [String]
    let query: [String: String]

    init(_ uri: String) {
        let pieces = uri.split(separator: "?", maxSplits: 1)
        parts = (pieces.first ?? "").split(separator: "/").map { String($0).removingPercentEncoding ?? String($0) }
        var query: [String: String] = [:]
        if pieces.count > 1 {
            for pair in pieces[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1)
                query[String(kv[0])] = kv.count > 1 ? (String(kv[1]).removingPercentEncoding ?? String(kv[1])) : ""
            }
        }
        self.query = query
    }

    /// The parts `pattern`'s "*" stand for, when the path has `pattern`'s shape.
    func match(_ pattern: String...) -> [String]? {
        guard pattern.count == parts.count else { return nil }
        var captured: [String] = []
        for (expected, part) in zip(pattern, parts) {
            if expected == "*" { captured.append(part) } else if expected != part { return nil }
        }
        return captured
    }

    struct BadBody: Error, CustomStringConvertible {
        var description: String
    }

    static func decode<T: Decodable>(_ type: T.Type, _ body: Data) throws -> T {
        do { return try APIJSON.decoder.decode(type, from: body) } catch {
            throw BadBody(description: "the body is not a valid \(type): \(error)")
        }
    }

    /// 405 with the Allow header's methods named when the path exists, 404 when it does not.
    static func unknown(_ method: String, _ path: RoutePath, known: [(methods: [String], pattern: [String])]) -> APIResponse {
        let matching = known.filter { route in
            route.pattern.count == path.parts.count && zip(route.pattern, path.parts).allSatisfy { $0 == "*" || $0 == $1 }
        }
        guard !matching.isEmpty else { return .error(404, "not_found", "no route \(method) /\(path.parts.joined(separator: "/"))") }
        let allowed = matching.flatMap(\.methods).joined(separator: ", ")
        var response = APIResponse.error(405, "method_not_allowed", "/\(path.parts.joined(separator: "/")) takes \(allowed)")
        response.headers = [("Allow", allowed)]
        return response
    }
}
