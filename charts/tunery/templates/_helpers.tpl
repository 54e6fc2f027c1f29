{{- define "tunery.name" -}}tunery-operator{{- end -}}

{{- define "tunery.labels" -}}
app.kubernetes.io/name: tunery
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: tunery
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "tunery.selector" -}}
app.kubernetes.io/name: tunery
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The operator's rules: what it reads, the children it applies, the trainer identity it grants. */}}
{{- define "tunery.rules" -}}
- apiGroups: [tunery.dev]
  resources: [finetunejobs]
  verbs: [get, list, watch]
- apiGroups: [tunery.dev]
  resources: [finetunejobs/status]
  verbs: [get, patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps, serviceaccounts]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [list, create, patch]
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, create, patch]
# A Job that Kueue holds: its Workload says why (read-only; absent without Kueue).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list]
{{- end -}}


{{/* The operator's policy file: the `policy` values as YAML. */}}
{{- define "tunery.policy" -}}
{{ toYaml .Values.policy }}
{{- end -}}
