{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "rayfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, plus the chart name unless the release name contains it. */}}
{{- define "rayfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rayfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rayfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "rayfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rayfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rayfleet
{{- end }}

{{- define "rayfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rayfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Cluster-scoped objects are shared by every release: qualify them with the release namespace. */}}
{{- define "rayfleet.clusterName" -}}
{{- printf "%s-%s" (include "rayfleet.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rayfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "rayfleet.replicaImage" -}}
{{- printf "%s:%s" .Values.replicaImage.repository (default .Chart.AppVersion .Values.replicaImage.tag) }}
{{- end }}

{{/* The watched namespaces, validated: a list of DNS-1123 labels, without duplicates. */}}
{{- define "rayfleet.watchNamespaces" -}}
{{- $ns := .Values.watchNamespaces | default list }}
{{- if not (kindIs "slice" $ns) }}
{{- fail "watchNamespaces must be a list of namespace names (or empty for the whole cluster)" }}
{{- end }}
{{- range $ns }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString .)) }}
{{- fail (printf "watchNamespaces: %q is not a valid namespace name" (toString .)) }}
{{- end }}
{{- end }}
{{- if ne (len $ns) (len (uniq $ns)) }}
{{- fail "watchNamespaces has duplicates" }}
{{- end }}
{{- toJson $ns }}
{{- end }}
