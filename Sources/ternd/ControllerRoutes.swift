import Foundation
import TernAPI
import TernCluster
import TernClusterEtcd

/// The controller's HTTP API (docs/cluster-api.yaml), on its Unix socket for `tern cluster`:
///   GET  /v1/hosts                  -> [HostView]
///   POST /v1/hosts {name, address}  -> 201 HostRecord
///   POST /v1/hosts/NAME/undrain     -> 204
///   GET  /v1/vms                    -> [PlacedVM]
///   POST /v1/vms {host, spec}       -> 201 VMStatus
///   GET  /v1/migrations             -> [MigrationRecord]
///   POST /v1/migrations {vm, to}    -> 202 OperationRecord
///   GET  /v1/operations             -> [OperationRecord]
///   POST /v1/evacuate {host}        -> 202 OperationRecord, or 409 with why nothing moves
///   POST /v1/balance                -> 202 OperationRecord (its migrations even out memory use)
struct ControllerRoutes: Sendable {
    /// What GET /v1/controller says of this controller.
    struct Identity: Sendable {
        var name: String
        var store: String
        var leadership: EtcdLeadership?
    }

    let controller: ClusterController
    let metrics: MetricsEndpoint
    let identity: Identity
    /// The web page's listener: GET only (what changes the cluster goes through the Unix socket).
    let readOnly: Bool

    func handle(method: String, uri: String, body: Data) -> APIResponse {
        let path = RoutePath(uri)
        if readOnly && method != "GET" {
            return APIResponse(status: 405, contentType: "application/json",
                               body: (try? APIJSON.encoder.encode(APIErrorBody(code: "read_only",
                                   message: "this listener is read-only: change the cluster through the controller's Unix socket (tern cluster)"))) ?? Data(),
                               headers: [("Allow", "GET")])
        }
        do {
            if method == "GET", path.parts.isEmpty || path.match("index.html") != nil {
                return APIResponse(status: 200, contentType: "text/html; charset=utf-8", body: Data(ControllerPage.html.utf8))
            } else if method == "GET", path.match("metrics") != nil {
                let observations = controller.lastObservations
                let migrations = (try? controller.store.migrations()) ?? []
                return metrics.response { now in
                    for state in ["ready", "draining", "unreachable"] {
                        MetricsEndpoint.gauge(now, "tern_cluster_hosts", "Hosts by state.", [("state", state)]).set(to: Double(observations.filter { seen in
                            seen.status == nil ? state == "unreachable" : (seen.record.draining ? state == "draining" : state == "ready")
                        }.count))
                    }
                    for seen in observations {
                        MetricsEndpoint.gauge(now, "tern_cluster_vms", "VMs running on each host.", [("host", seen.record.name)])
                            .set(to: Double(seen.status?.residentVMs.count ?? 0))
                    }
                    for phase in MigrationPhase.allCases where !phase.isFinished {
                        MetricsEndpoint.gauge(now, "tern_cluster_migrations", "Migrations not yet finished, by phase.", [("phase", phase.rawValue)])
                            .set(to: Double(migrations.filter { $0.phase == phase }.count))
                    }
                    MetricsEndpoint.gauge(now, "tern_cluster_store_up", "1 while the controller's store answers.")
                        .set(to: controller.storeUnavailable == nil ? 1 : 0)
                }
            } else if method == "GET", path.match("v1", "controller") != nil {
                return json(ControllerAPI.ControllerView(name: identity.name, store: identity.store,
                                                         leading: identity.leadership?.isLeader ?? true,
                                                         leader: identity.leadership.map { $0.leader } ?? identity.name,
                                                         storeError: controller.storeUnavailable))
            } else if method == "GET", path.match("v1", "hosts") != nil {
                return json(controller.observeNow().map { seen in
                    ControllerAPI.HostView(name: seen.record.name, address: seen.record.address, draining: seen.record.draining, reachable: seen.status != nil,
                             error: seen.error, leaseAlive: seen.leaseAlive, memoryCapacityMib: seen.status?.memoryCapacityMib, memoryFreeMib: seen.status?.freeMib,
                             vms: seen.status?.residentVMs.count, seenAt: seen.at)
                })
            } else if method == "POST", path.match("v1", "hosts") != nil {
                let request = try RoutePath.decode(ControllerAPI.AddHost.self, body)
                let record = HostRecord(name: request.name, address: request.address)
                try controller.addHost(record)
                return json(record, status: 201)
            } else if method == "POST", let captured = path.match("v1", "hosts", "*", "undrain") {
                let name = captured[0]
                try controller.undrain(name)
                return .noContent()
            } else if method == "GET", path.match("v1", "vms") != nil {
                return json(controller.observeNow().flatMap { seen in
                    (seen.status?.vms ?? []).filter { $0.state != .departed }.map { ControllerAPI.PlacedVM(host: seen.record.name, vm: $0) }
                })
            } else if method == "POST", path.match("v1", "vms") != nil {
                let request = try RoutePath.decode(ControllerAPI.CreateVM.self, body)
                return json(try controller.createVM(request.spec, on: request.host), status: 201)
            } else if method == "GET", path.match("v1", "migrations") != nil {
                return json(try controller.store.migrations())
            } else if method == "POST", path.match("v1", "migrations") != nil {
                let request = try RoutePath.decode(ControllerAPI.Migrate.self, body)
                return json(try controller.migrate(request.vm, to: request.to), status: 202)
            } else if method == "GET", path.match("v1", "operations") != nil {
                return json(try controller.store.operations())
            } else if method == "POST", path.match("v1", "balance") != nil {
                return json(try controller.balance(), status: 202)
            } else if method == "POST", path.match("v1", "evacuate") != nil {
                return json(try controller.evacuate(try RoutePath.decode(ControllerAPI.Evacuate.self, body).host), status: 202)
            } else {
                return RoutePath.unknown(method, path, known: Self.routes)
            }
        } catch let refusal as ClusterController.Refusal {
            switch refusal {
            case .invalid(let why): return .error(400, "bad_request", why)
            case .placement(let why): return .error(409, "refused", why.description)
            case .unavailable(let why): return .error(503, "unavailable", why)
            }
        } catch let refusal as RoutePath.BadBody {
            return .error(400, "bad_request", refusal.description)
        } catch {
            return .error(500, "failed", "\(error)")
        }
    }

    private func json(_ value: some Encodable, status: Int = 200) -> APIResponse {
        APIResponse(status: status, contentType: "application/json", body: (try? ClusterJSON.encoder.encode(value)) ?? Data())
    }

    static let routes: [(methods: [String], pattern: [String])] = [
        (["GET"], []), (["GET"], ["metrics"]), (["GET"], ["v1", "controller"]), (["GET", "POST"], ["v1", "hosts"]), (["POST"], ["v1", "hosts", "*", "undrain"]), (["GET", "POST"], ["v1", "vms"]),
        (["GET", "POST"], ["v1", "migrations"]), (["GET"], ["v1", "operations"]), (["POST"], ["v1", "evacuate"]), (["POST"], ["v1", "balance"]),
    ]
}
