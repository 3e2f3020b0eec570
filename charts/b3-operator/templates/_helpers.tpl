{{- define "b3.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "b3.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "b3.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "b3.serviceAccountName" -}}
{{- default (include "b3.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The rules of b3_operator.rbac.RULES (tests/test_chart.py keeps them equal). */}}
{{- define "b3.namespacedRules" -}}
- apiGroups: [b3.dev]
  resources: [b3jobs]
  verbs: [get, list, watch, patch]
- apiGroups: [b3.dev]
  resources: [b3jobs/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch]
- apiGroups: [ray.io]
  resources: [rayjobs]
  verbs: [get, list, watch, create, patch]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, watch, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [events]
  verbs: [list]
{{- end -}}
