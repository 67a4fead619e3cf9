"""Offline checks of rendered manifests that schema validation alone cannot make.

    check.py raw DIR               print DIR's kustomization `resources` as one stream
                                   (the fallback when kubectl is missing: no transformers)
    check.py verify OUTDIR RENDER...
                                   check each rendered stream and write its built-in
                                   objects to OUTDIR/NAME for kubernetes-validate

`verify` checks custom resources against the CRDs found in the renders (kubernetes-validate
knows built-in kinds only), and the references between objects of one render: Service,
PodDisruptionBudget and NetworkPolicy selectors, named ports, mounted ConfigMaps and
Secrets, service accounts and bindings, ScoringEndpoint keys Secrets, Services and
Deployments, and that a pod running `scorefront serve` gives it time to drain.
"""

import base64
import copy
import os
import posixpath
import sys

import jsonschema
import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
CLUSTER_SCOPED = {
    "Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
    "PriorityClass", "StorageClass", "IngressClass", "PersistentVolume",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
}
DEFAULT_GRACE = 30  # Kubernetes' terminationGracePeriodSeconds and scorefront's drain


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def raw(directory, seen=()):
    """The documents a kustomization lists under `resources`, recursively."""
    directory = os.path.normpath(directory)
    if directory in seen:
        sys.exit(f"{directory}: kustomization cycle")
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if os.path.exists(os.path.join(directory, name)):
            k = load_all(os.path.join(directory, name))[0]
            break
    else:
        sys.exit(f"{directory}: no kustomization file")
    skipped = sorted(set(k) - {"apiVersion", "kind", "resources", "images", "labels"})
    if skipped:
        print(f"note: {directory}: not applied without kubectl: {', '.join(skipped)}",
              file=sys.stderr)
    docs = []
    for res in k.get("resources", []):
        path = os.path.join(directory, res)
        if os.path.isdir(path):
            docs += raw(path, seen + (directory,))
        else:
            docs += load_all(path)
    return docs


def group_of(api_version):
    return api_version.rpartition("/")[0]


def ns_of(obj):
    return obj["metadata"].get("namespace", "default")


def openapi_to_jsonschema(schema, root=True):
    """A CRD's OpenAPI v3 schema as JSON Schema, strict like `kubectl apply`'s field
    validation: unknown fields are errors unless the schema preserves them."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    if root:
        props = s.setdefault("properties", {})
        for field in ("apiVersion", "kind"):
            props.setdefault(field, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    walk(s)
    return s


class Render:
    """One kustomization's output and the problems found in it."""

    def __init__(self, name, docs):
        self.name = name
        self.docs = docs
        self.problems = []

    def problem(self, obj, message):
        where = f"{obj['kind']}/{obj['metadata'].get('name', '?')}" if obj else ""
        self.problems.append(f"{self.name}: {where}: {message}")

    def find(self, kind, ns, name):
        for d in self.docs:
            if (d["kind"] == kind and d["metadata"].get("name") == name
                    and (kind in CLUSTER_SCOPED or ns_of(d) == ns)):
                return d
        return None

    def pod_templates(self, ns):
        for d in self.docs:
            if d["kind"] in WORKLOADS and ns_of(d) == ns:
                yield d, d["spec"]["template"]


def containers(pod_spec):
    return pod_spec.get("initContainers", []) + pod_spec.get("containers", [])


def secret_value(secret, key):
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    if key in secret.get("data", {}):
        return base64.b64decode(secret["data"][key]).decode()
    return None


def check_custom(render, obj, crds):
    group, _, version = obj["apiVersion"].rpartition("/")
    crd = crds.get((group, obj["kind"]))
    if crd is None:
        render.problem(obj, f"no CustomResourceDefinition for {obj['apiVersion']} {obj['kind']}")
        return
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served"):
            schema = openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
            for err in jsonschema.Draft4Validator(schema).iter_errors(obj):
                path = ".".join(str(p) for p in err.absolute_path)
                render.problem(obj, f"{path}: {err.message}")
            return
    render.problem(obj, f"the CRD serves no version {version}")


def check_scoring_endpoint(render, se):
    ns, spec = ns_of(se), se.get("spec", {})
    if spec.get("authMode", "key") == "key":
        name = spec.get("keysSecret")
        secret = render.find("Secret", ns, name) if name else None
        if not name:
            render.problem(se, "authMode key needs keysSecret")
        elif secret is None:
            render.problem(se, f"keysSecret {name} is not in this render")
        else:
            labels = secret["metadata"].get("labels", {})
            if labels.get("scorefront.io/keys") != "true":
                render.problem(secret, 'needs label scorefront.io/keys: "true"')
            for key in ("primaryKey", "secondaryKey"):
                if not secret_value(secret, key):
                    render.problem(secret, f"no {key}")
    for v in spec.get("versions", []):
        if "service" not in v:
            continue
        service = render.find("Service", ns, v["service"])
        if service is None:
            render.problem(se, f"version {v['name']}: no Service {v['service']}")
        elif isinstance(v.get("port"), str):
            names = [p.get("name") for p in service["spec"].get("ports", [])]
            if v["port"] not in names:
                render.problem(se, f"version {v['name']}: Service {v['service']} "
                                   f"has no port {v['port']}")
        deployment = v.get("deployment", v["service"])
        if render.find("Deployment", ns, deployment) is None:
            render.problem(se, f"version {v['name']}: no Deployment {deployment}")


def matching_templates(render, obj, selector):
    found = [t for _, t in render.pod_templates(ns_of(obj))
             if selector.items() <= t["metadata"].get("labels", {}).items()]
    if not found:
        render.problem(obj, f"selector {selector} matches no pod template")
    return found


def check_service(render, svc):
    selector = svc["spec"].get("selector")
    if not selector:
        return
    for template in matching_templates(render, svc, selector):
        names = {p.get("name") for c in containers(template["spec"]) for p in c.get("ports", [])}
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str) and target not in names:
                render.problem(svc, f"targetPort {target} is no container port")


def read_mounted(render, ns, pod_spec, container, path):
    """The text of the file at `path` in `container`, from a ConfigMap or Secret volume
    of this render, or None."""
    mounts = [m for m in container.get("volumeMounts", [])
              if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    rel = posixpath.relpath(path, mount["mountPath"])
    volume = next((v for v in pod_spec.get("volumes", []) if v["name"] == mount["name"]), None)
    if volume is None:
        return None
    sources = volume.get("projected", {}).get("sources", [volume])
    for src in sources:
        for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
            if field not in src:
                continue
            ref = src[field]
            name = ref.get("name", ref.get("secretName"))
            items = ref.get("items")
            key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
            obj = render.find(kind, ns, name)
            if key is None or obj is None:
                continue
            if kind == "ConfigMap":
                return obj.get("data", {}).get(key)
            return secret_value(obj, key)
    return None


def check_pod(render, owner, template):
    ns, spec = ns_of(owner), template["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        for src in v.get("projected", {}).get("sources", [v]):
            for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
                ref = src.get(field)
                if ref and not ref.get("optional"):
                    name = ref.get("name", ref.get("secretName"))
                    if render.find(kind, ns, name) is None:
                        render.problem(owner, f"volume {v['name']}: no {kind} {name}")
    sa = spec.get("serviceAccountName", "default")
    if sa != "default" and render.find("ServiceAccount", ns, sa) is None:
        render.problem(owner, f"no ServiceAccount {sa}")

    sleeps = 0
    drains = []
    for c in containers(spec):
        ports = {p.get("name") for p in c.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str) and port not in ports:
                render.problem(owner, f"{c['name']}: {probe} port {port} is no container port")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                render.problem(owner, f"{c['name']}: mounts unknown volume {m['name']}")
        sleeps += c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        args = c.get("command", []) + c.get("args", [])
        if "scorefront" in c.get("image", "") and "serve" in args and "--config" in args:
            path = args[args.index("--config") + 1]
            text = read_mounted(render, ns, spec, c, path)
            if text is None:
                render.problem(owner, f"{c['name']}: {path} is not mounted from this render")
                continue
            config = yaml.safe_load(text)
            if not isinstance(config, dict) or "endpoints" not in config:
                render.problem(owner, f"{c['name']}: {path} has no endpoints")
                continue
            if "https" in config.get("listen", {}) and "tls" not in config:
                render.problem(owner, f"{c['name']}: listen.https without tls")
            drains.append(config.get("shutdownGracePeriodSeconds", DEFAULT_GRACE))
            endpoints_file = config["endpoints"].get("file")
            if endpoints_file:
                endpoints_path = posixpath.join(posixpath.dirname(path), endpoints_file)
                text = read_mounted(render, ns, spec, c, endpoints_path)
                if text is None:
                    render.problem(owner, f"{c['name']}: {endpoints_path} is not mounted")
                elif not all(d.get("kind") == "ScoringEndpoint"
                             for d in yaml.safe_load_all(text) if d):
                    render.problem(owner, f"{c['name']}: {endpoints_path} holds more "
                                          "than ScoringEndpoints")
    grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
    if drains and grace <= sleeps + sum(drains):
        render.problem(owner, f"terminationGracePeriodSeconds {grace} must exceed the "
                              f"preStop sleeps ({sleeps}) plus scorefront's drain ({sum(drains)})")


def check_binding(render, obj):
    ref = obj["roleRef"]
    if render.find(ref["kind"], ns_of(obj), ref["name"]) is None:
        render.problem(obj, f"roleRef {ref['kind']} {ref['name']} is not in this render")
    for s in obj.get("subjects", []):
        if s["kind"] == "ServiceAccount" and render.find(
                "ServiceAccount", s.get("namespace", ns_of(obj)), s["name"]) is None:
            render.problem(obj, f"subject ServiceAccount {s.get('namespace')}/{s['name']} "
                                "is not in this render")


def verify(outdir, paths):
    renders = [Render(os.path.basename(p), load_all(p)) for p in paths]
    crds = {}
    for r in renders:
        for d in r.docs:
            if d.get("kind") == "CustomResourceDefinition":
                crds[(d["spec"]["group"], d["spec"]["names"]["kind"])] = d
    custom_groups = {group for group, _ in crds}
    problems = []
    for r in renders:
        if not r.docs:
            r.problem(None, "renders nothing")
        seen = set()
        builtin = []
        for d in r.docs:
            ident = (group_of(d["apiVersion"]), d["kind"], d["metadata"].get("namespace"),
                     d["metadata"].get("name"))
            if ident in seen:
                r.problem(d, "defined twice")
            seen.add(ident)
            group = group_of(d["apiVersion"])
            if group in custom_groups or (group.count(".") and not group.endswith(".k8s.io")):
                check_custom(r, d, crds)
            else:
                builtin.append(d)
            if d["kind"] == "ScoringEndpoint":
                check_scoring_endpoint(r, d)
            elif d["kind"] == "Service":
                check_service(r, d)
            elif d["kind"] == "PodDisruptionBudget":
                matching_templates(r, d, d["spec"]["selector"].get("matchLabels", {}))
            elif d["kind"] == "NetworkPolicy":
                matching_templates(r, d, d["spec"]["podSelector"].get("matchLabels", {}))
            elif d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                check_binding(r, d)
            elif d["kind"] in WORKLOADS:
                check_pod(r, d, d["spec"]["template"])
        with open(os.path.join(outdir, r.name), "w") as f:
            yaml.safe_dump_all(builtin, f, sort_keys=False)
        custom = len(r.docs) - len(builtin)
        print(f"{r.name}: {len(r.docs)} objects, {custom} custom, "
              f"{len(r.problems)} problems")
        problems += r.problems
    for p in problems:
        print(f"ERROR {p}")
    return 1 if problems else 0


def main(argv):
    if len(argv) == 2 and argv[0] == "raw":
        yaml.safe_dump_all(raw(argv[1]), sys.stdout, sort_keys=False)
        return 0
    if len(argv) >= 3 and argv[0] == "verify":
        return verify(argv[1], argv[2:])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
