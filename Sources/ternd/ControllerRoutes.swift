import Foundation
import TernAPI
import TernCluster

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
struct ControllerRoutes: Sendable {
    let controller: ClusterController

    func handle(method: String, uri: String, body: Data) -> APIResponse {
        let path = RoutePath(uri)
        do {
            if method == "GET", path.match("v1", "hosts") != nil {
                return json(controller.observeNow().map { seen in
                    ControllerAPI.HostView(name: seen.record.name, address: seen.record.address, draining: seen.record.draining, reachable: seen.status != nil,
                             error: seen.error, memoryCapacityMib: seen.status?.memoryCapacityMib, memoryFreeMib: seen.status?.freeMib,
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
        (["GET", "POST"], ["v1", "hosts"]), (["POST"], ["v1", "hosts", "*", "undrain"]), (["GET", "POST"], ["v1", "vms"]),
        (["GET", "POST"], ["v1", "migrations"]), (["GET"], ["v1", "operations"]), (["POST"], ["v1", "evacuate"]),
    ]
}
